"""A torchvision or Keras weight file to checked Flax variables, in one pass:

    read the file (no more bytes than the model can need)
    -> flat Flax names ('params/denseblock1/denselayer1/conv1/kernel', ...)
    -> the model fitted to them (classes from the file, the source's BatchNorm epsilon)
    -> every name and shape checked -> variables.

The readers (`torchvision.py`, `keras.py`) know their file formats and names only; the size
bounds and the checks are `common.py`'s; this module joins the two.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping

from densenet_jax import models
from densenet_jax.pretrained import common, keras, torchvision


@dataclasses.dataclass(frozen=True)
class Reader:
  """What one source framework contributes: how its files read and what its tensors are named."""

  what: str  # in messages: '<what> <file>'
  bn_epsilon: float  # the epsilon the weights were trained with; any other shifts every activation
  read: Callable[[pathlib.Path, str | models.DenseNet], Any]  # the file's own structure
  to_flat: Callable[[Any, models.DenseNet], tuple[common.Flat, dict[str, str]]]  # + source names
  # Zero-byte stand-ins of the arrays, from the file's headers alone; None where the format
  # offers no such pass.
  shapes: Callable[[pathlib.Path, str | models.DenseNet], Any | None]


READERS = {
    "torchvision": Reader("torchvision weights", torchvision.BN_EPSILON,
                          torchvision.read_torchvision,
                          lambda state_dict, _: torchvision.torchvision_to_flat(state_dict),
                          torchvision.read_shapes),
    "keras": Reader("Keras weights", keras.BN_EPSILON, keras.read_keras, keras.keras_to_flat,
                    lambda path, model: None),
}
SOURCES = tuple(READERS)
BN_EPSILON = {name: reader.bn_epsilon for name, reader in READERS.items()}


def variables(source: str, weights: common.PathLike | Mapping[str, Any],
              model: str | models.DenseNet) -> tuple[models.DenseNet, common.Variables]:
  """(model, variables) from a weight file, or its contents in memory; checks every tensor.

  A model name takes its class count from the file; a DenseNet instance keeps its layout. Both
  take the source's BatchNorm epsilon.
  """
  reader = _reader(source)
  what = f"{reader.what} {common.describe(weights)}"
  contents = weights
  if isinstance(weights, (str, os.PathLike)):
    path = common.existing(weights)
    shapes = reader.shapes(path, model)
    if shapes is not None:  # refused from the headers, before any array is read
      flat, origin, fitted, name = _named(reader, shapes, model)
      common.check_fits(flat, fitted, what, name, origin)
    contents = reader.read(path, model)
  flat, origin, fitted, name = _named(reader, contents, model)
  return fitted, common.check_and_unflatten(flat, fitted, what, name, origin)


def _reader(source: str) -> Reader:
  if source not in READERS:
    raise ValueError(f"Unknown source {source!r}: use one of {SOURCES}.")
  return READERS[source]


def _named(reader: Reader, contents: Any, model: str | models.DenseNet
           ) -> tuple[common.Flat, dict[str, str], models.DenseNet, str]:
  """(flat arrays, Flax path -> source name, the model fitted to them, its name in messages)."""
  # Keras 3 files may carry no layer names: their order is matched against the preset's layers.
  layout = models.get_model(model) if isinstance(model, str) else model
  flat, origin = reader.to_flat(contents, layout)
  fitted, name = common.fit_model(flat, model, reader.bn_epsilon)
  return flat, origin, fitted, name


def from_torchvision(weights: common.PathLike | Mapping[str, Any],
                     model: str | models.DenseNet) -> tuple[models.DenseNet, common.Variables]:
  """(model, variables) from a torchvision state_dict or its file; checks every tensor."""
  return variables("torchvision", weights, model)


def from_keras(weights: common.PathLike | Mapping[str, Mapping[str, Any]],
               model: str | models.DenseNet) -> tuple[models.DenseNet, common.Variables]:
  """(model, variables) from keras.applications DenseNet weights; checks every tensor."""
  return variables("keras", weights, model)


def guess_from_file(source: str, weights: common.PathLike) -> str:
  """The preset a weight file was saved from, or a ValueError asking for --model."""
  if _reader(source) is READERS["torchvision"]:
    flat, _ = torchvision.torchvision_to_flat(torchvision.read_torchvision(weights, shapes=True))
  else:
    flat = {"params/" + keras.keras_module_path(layer) + "/kernel": v["kernel"]
            for layer, v in keras.read_keras(weights).items() if "kernel" in v}
  guess = common.guess_model(flat)
  if guess is None or guess not in models.list_models():
    found = guess or "no dense layers found"
    raise ValueError(f"Cannot tell which DenseNet {weights} holds ({found}); name it with "
                     f"--model.")
  return guess
