"""Model zoo: ``create_model(name, num_classes, in_channels, input_size)`` over a timm-style registry.

Importing this package registers every family; each family lives in its own module.
``customized_pruners()`` tells torch-pruning how to prune the zoo's parameter-free custom modules.
"""
from __future__ import annotations

from . import digits, mobilenetv2, resnet, resnet_cifar, vgg, wrn  # noqa: F401  (registration side effects)
from .pruning import customized_pruners
from .registry import create_model, list_models, model_defaults, register_model, resolve_model_name

__all__ = ["create_model", "customized_pruners", "list_models", "model_defaults", "register_model", "resolve_model_name"]
