"""Use a trained model: inference on an image through the host library's own inferencer
and visualizer (mmseg, mmpose or mmpretrain, chosen from the config's ``default_scope``)."""
from .inference import TASKS, InferenceResult, detect_task, inference, load_config, load_image

__all__ = ['TASKS', 'InferenceResult', 'detect_task', 'inference', 'load_config',
           'load_image']
