"""DenseNet in JAX/Flax: `from densenet_jax import models`."""

from densenet_jax import models
from densenet_jax.models import DenseNet, get_model, list_models

__all__ = ["models", "DenseNet", "get_model", "list_models"]
__version__ = "0.3.0"  # CHANGELOG.md
