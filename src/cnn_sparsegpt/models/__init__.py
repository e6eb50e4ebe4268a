"""Models: importing this package registers the built-in ones."""
from . import cifar, cnns
from .registry import (
    ModelEntry,
    check_model_name,
    create_model,
    head_classes,
    is_video_model,
    list_models,
    model_entry,
    register_model,
)

__all__ = [
    "ModelEntry", "check_model_name", "create_model", "head_classes", "is_video_model", "list_models", "model_entry",
    "register_model",
]
