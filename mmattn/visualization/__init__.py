"""See what the attention blocks attend to: capture (forward hooks) and rendering."""
from .attention_maps import (CMAP, NEAR_CONSTANT_RTOL, AttentionMap, AttentionRecorder,
                             ColourScale, colour_scale, criss_cross_maps, draw_attention,
                             outlook_pixel_map, render_attention, visualize_attention)
from .demo_image import DEMO_IMAGE, make_demo_image, save_demo_image

__all__ = ['AttentionMap', 'AttentionRecorder', 'CMAP', 'ColourScale', 'NEAR_CONSTANT_RTOL',
           'colour_scale', 'criss_cross_maps', 'draw_attention', 'outlook_pixel_map',
           'render_attention', 'visualize_attention', 'DEMO_IMAGE', 'make_demo_image',
           'save_demo_image']
