"""The math: pure functions on ``nn.Module``s and tensors. No I/O, no Redis, no HTTP."""

from deepscope.analysis.hooks import Capture, Where, capture_activations, eval_mode
from deepscope.analysis.layers import LayerKind, WeightLayer, select_layers, weight_layers

__all__ = [
    "Capture",
    "LayerKind",
    "WeightLayer",
    "Where",
    "capture_activations",
    "eval_mode",
    "select_layers",
    "weight_layers",
]
