"""resnet: the networks, recipes and experiments of He et al., "Deep Residual Learning for Image
Recognition" (CVPR 2016, arXiv:1512.03385), in PyTorch."""

from .errors import UserError
from .models import create_model, list_models, model_spec

__version__ = "0.1.0"
__all__ = ["UserError", "create_model", "list_models", "model_spec", "__version__"]
