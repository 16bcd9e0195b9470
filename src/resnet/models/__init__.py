"""The paper's networks: blocks, the general ResNet, and the registry of named models."""

from .blocks import BasicBlock, Bottleneck, PadShortcut
from .registry import MODELS, OPTIONS, ModelSpec, create_model, list_models, model_spec, resolve_options
from .resnet import ResNet

__all__ = ["BasicBlock", "Bottleneck", "PadShortcut", "ResNet", "MODELS", "OPTIONS", "ModelSpec",
           "create_model", "list_models", "model_spec", "resolve_options"]
