"""Cost analysis of models and attention blocks (parameters, MACs, activation memory)."""
from .build import LoadedModel, TensorForward, load_model
from .costs import (EXTRA_FLOP_HANDLES, BlockCost, ModelCost, block_variants,
                    count_flops, format_bytes, format_count, iter_attention_blocks,
                    measure_block, model_costs, saved_bytes)

__all__ = ['LoadedModel', 'TensorForward', 'load_model', 'EXTRA_FLOP_HANDLES', 'BlockCost',
           'ModelCost', 'block_variants', 'count_flops', 'format_bytes',
           'format_count', 'iter_attention_blocks', 'measure_block', 'model_costs',
           'saved_bytes']
