"""Pretrained ImageNet weights from torchvision, timm and keras.applications, by name or file.

    model, variables = pretrained.load("densenet121")        # downloaded, verified, cached
    model, variables = pretrained.load("keras/densenet169")  # Keras' weights (h5py only)
    model, variables = pretrained.load("densenet121.npz")    # a converted checkpoint file
    logits = model.apply(variables, images)   # NHWC, normalised with imagenet.MEAN/STD

A name is looked up in `hub.REGISTRY` (published files with pinned hashes; see hub for the
cache and the DENSENET_JAX_CACHE / DENSENET_JAX_MIRROR variables); anything else is a path.
A file takes one path (`sources.variables`): its reader (`torchvision.py`, `keras.py`) reads
it and renames every tensor to the Flax variable path it belongs to (the Flax names already
follow torchvision), transposing where layouts differ; then each name and shape is checked
against the model: a missing, unexpected or misshapen tensor raises a ValueError naming it.
The model is rebuilt with the source framework's BatchNorm epsilon (torchvision 1e-5, Keras
1.001e-5).

Training after import differs from torch in one documented way: torch updates running_var
with the unbiased batch variance (times n/(n-1), n = batch * height * width), Flax with the
biased one. Inference, parameter gradients and the running mean are unaffected.
"""

from __future__ import annotations

from typing import Any

from densenet_jax import models
from densenet_jax.pretrained import checkpoint, common, hub
from densenet_jax.pretrained.checkpoint import FORMAT, FORMAT_VERSION, METADATA_KEY, convert, save
from densenet_jax.pretrained.common import (check_and_unflatten, flat_variable_shapes,
                                            guess_model)
from densenet_jax.pretrained.hub import REGISTRY, WeightsError
from densenet_jax.pretrained.keras import (keras_layer_names, keras_module_path, keras_to_flat,
                                           read_keras)
from densenet_jax.pretrained.sources import BN_EPSILON, SOURCES, from_keras, from_torchvision
from densenet_jax.pretrained.torchvision import read_torchvision, torchvision_to_flat


def read_checkpoint(weights: common.PathLike) -> tuple[dict[str, Any], common.Flat]:
  """(metadata, flat arrays) of a checkpoint file or of registered weights by name."""
  return hub.resolve_and_read(weights, checkpoint.read)


def load(weights: common.PathLike, **overrides: Any
         ) -> tuple[models.DenseNet, common.Variables]:
  """(model, variables) from a checkpoint file or a name; overrides must keep shapes."""
  model, variables, _ = load_with_metadata(weights, **overrides)
  return model, variables


def load_with_metadata(weights: common.PathLike, **overrides: Any
                       ) -> tuple[models.DenseNet, common.Variables, dict[str, Any]]:
  """`load` plus the checkpoint's metadata (model, source, bn_epsilon, mean, std, ...)."""
  return hub.resolve_and_read(weights, lambda path: checkpoint.load(path, **overrides))


__all__ = [
    "BN_EPSILON", "FORMAT", "FORMAT_VERSION", "METADATA_KEY", "REGISTRY", "SOURCES",
    "WeightsError", "check_and_unflatten", "flat_variable_shapes", "convert", "from_keras",
    "from_torchvision", "guess_model", "keras_layer_names", "keras_module_path",
    "keras_to_flat", "load", "load_with_metadata", "read_checkpoint", "read_keras",
    "read_torchvision", "save", "torchvision_to_flat",
]
