"""mmengine hooks of mmattn's tools."""
from __future__ import annotations

from typing import Any

from mmengine.hooks import Hook

from mmattn.registry import HOOKS
from mmattn.utils.checkpoint import restore_from_weights_only, to_weights_only


@HOOKS.register_module()
class WeightsOnlyCheckpointHook(Hook):
    """Write checkpoints that ``torch.load(path, weights_only=True)`` reads without
    allow-listing anything, and read them back exactly when a run resumes.

    Before a checkpoint is saved, the message hub's ``HistoryBuffer`` s and the numpy arrays,
    scalars and dtypes mmengine puts in ``meta`` and ``message_hub`` become tensors and plain
    Python (see :func:`mmattn.utils.checkpoint.to_weights_only`), so that
    ``mmseg.apis.init_model``, ``mmpose.apis.init_model``, mmpretrain's ``get_model`` and
    plain ``torch.load`` open the file in a process that never imported mmattn. After a
    checkpoint is loaded, the recorded conversions are undone, so ``Runner.resume`` restores
    the message hub as mmengine saved it. Checkpoints without the record (mmengine's own)
    pass through unchanged. Anything left that weights-only loading would refuse (an object
    another hook put in the checkpoint) is named in a warning.

    The lowest priority makes it convert after every other hook has added to the
    checkpoint. ``tools/train.py`` adds it to ``custom_hooks``; in a config of your own::

        custom_hooks = [dict(type='mmattn.WeightsOnlyCheckpointHook')]
    """

    priority = 'LOWEST'

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        for where, type_name in to_weights_only(checkpoint):
            runner.logger.warning(
                f'{where} is a {type_name}: torch.load(..., weights_only=True) will refuse '
                'this checkpoint (WeightsOnlyCheckpointHook converts only mmengine\'s '
                'HistoryBuffer and numpy objects)')

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        restore_from_weights_only(checkpoint)
