"""Architectures and their registry, datasets, loading uploaded model files, training recipes."""

from deepscope.models.datasets import (
    Dataset,
    channel_stats,
    class_averages,
    class_indices,
    load_dataset,
)
from deepscope.models.loading import (
    LoadedModel,
    code_models_allowed,
    detect_format,
    layer_input_shapes,
    load_model,
)
from deepscope.models.registry import (
    ModelSpec,
    get_model,
    get_model_spec,
    list_models,
    register_model,
)
from deepscope.models.training import Recipe, TrainResult, evaluate, train, train_model

__all__ = [
    "Dataset",
    "LoadedModel",
    "ModelSpec",
    "Recipe",
    "TrainResult",
    "channel_stats",
    "class_averages",
    "class_indices",
    "code_models_allowed",
    "detect_format",
    "evaluate",
    "get_model",
    "get_model_spec",
    "layer_input_shapes",
    "list_models",
    "load_dataset",
    "load_model",
    "register_model",
    "train",
    "train_model",
]
