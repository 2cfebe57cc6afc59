"""What every weight source shares: checking converted variables against the model, guessing
the preset a file holds, and turning reader failures into one clear error."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from flax import traverse_util

from densenet_jax import models

Flat = dict[str, np.ndarray]  # '/'-joined Flax variable path -> array
Variables = dict[str, Any]
PathLike = str | os.PathLike
T = TypeVar("T")
# More classes than any DenseNet head in use (ImageNet-21k has 21,841); a file claiming more
# is refused before its arrays are read, so a forged classifier shape cannot size the memory.
MAX_CLASSES = 100_000


def abstract_variables(model: models.DenseNet) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's variables as flat '/'-paths -> shape/dtype, without allocating them."""
  tree = models.abstract_variables(model, models.native_input_shape(model))
  return traverse_util.flatten_dict(tree, sep="/")


def variable_bytes(model: models.DenseNet) -> int:
  """The model's variables' size in float32 bytes (computed without allocating them)."""
  return sum(4 * int(np.prod(s.shape)) for s in abstract_variables(model).values())


def size_bound(model: str | models.DenseNet) -> int:
  """The most bytes a weight file of `model`, or a member of its archive, may plausibly hold:
  4x its float32 variables (with at least 1000 classes) plus 64 MiB for format overhead.

  Room for float64 storage and container overhead, yet small enough that a forged size or a
  compressed archive cannot make a reader allocate gigabytes for a model of megabytes.
  """
  if isinstance(model, str):
    model = models.get_model(model)
  model = model.clone(num_classes=max(model.num_classes, 1000), features_only=False)
  return 4 * variable_bytes(model) + (64 << 20)


def check_and_unflatten(flat: Mapping[str, np.ndarray], model: models.DenseNet,
                        what: str, model_name: str = "the model",
                        origin: Mapping[str, str] | None = None) -> Variables:
  """Nested float32 variables once every path and shape matches the model, else ValueError."""
  origin = origin or {}
  abstract = abstract_variables(model)
  expected = {k: abstract[k] for k in sorted(abstract, key=_network_order)}
  # Shape mismatches first: they say the most about which model the file really holds.
  mismatched = [f"{origin.get(k, k)!r} (-> {k}) has shape {tuple(flat[k].shape)} in the file "
                f"but {model_name} expects {tuple(s.shape)}"
                for k, s in expected.items() if k in flat and flat[k].shape != s.shape]
  unexpected = [f"{origin.get(k, k)!r} (-> {k}, shape {tuple(v.shape)}) has no place in "
                f"{model_name}" for k, v in flat.items() if k not in expected]
  missing = [f"{k} {tuple(s.shape)} is missing from the file"
             for k, s in expected.items() if k not in flat]
  problems = mismatched + unexpected + missing
  if problems:
    shown = "; ".join(problems[:6])
    more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    guess = guess_model(flat)
    hint = (f" The file looks like {guess}." if guess and guess != model_name else "")
    raise ValueError(f"{what} does not fit {model_name} ({len(mismatched)} shape mismatches, "
                     f"{len(unexpected)} unexpected, {len(missing)} missing): "
                     f"{shown}{more}.{hint}")
  # device_put, not jnp.asarray (which compiles a small program per distinct shape). On CPU
  # device_put may alias the numpy buffer, and a torch state_dict's numpy views share memory
  # with the live torch model: copy, so a later torch step cannot change these variables.
  return traverse_util.unflatten_dict(
      {k: jax.device_put(np.array(flat[k], np.float32, copy=True)) for k in expected}, sep="/")


def guess_model(flat: Mapping[str, Any]) -> str | None:
  """The ImageNet preset whose block layout and growth rate match the file, if any."""
  blocks: dict[int, int] = {}
  for key in flat:
    if m := re.search(r"denseblock(\d+)/denselayer(\d+)/", key):
      blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]))
  growth = flat.get("params/denseblock1/denselayer1/conv2/kernel")
  if not blocks or growth is None:
    return None
  config = tuple(blocks[i] for i in sorted(blocks))
  for name in ("densenet121", "densenet161", "densenet169", "densenet201", "densenet264"):
    preset = models.get_model(name)
    if tuple(preset.block_config) == config and preset.growth_rate == growth.shape[-1]:
      return name
  return f"a DenseNet with block_config={config}, growth_rate={growth.shape[-1]}"


def build(flat: Flat, origin: dict[str, str], model: str | models.DenseNet,
          bn_epsilon: float, what: str) -> tuple[models.DenseNet, Variables]:
  """Builds the model (classes from the file, the source's epsilon) and checks the weights.

  A DenseNet instance keeps its layout but takes the source's BatchNorm epsilon: the weights
  were trained with it, and any other value shifts every normalised activation.
  """
  if isinstance(model, str):
    name = model
    classifier = flat.get("params/classifier/kernel")
    num_classes = 0 if classifier is None else int(classifier.shape[-1])  # 0: headless file
    model = models.get_model(name, num_classes=num_classes, bn_epsilon=bn_epsilon)
  else:
    name, model = "the model", model.clone(bn_epsilon=bn_epsilon)
  return model, check_and_unflatten(flat, model, what, name, origin)


def _network_order(path: str) -> tuple:
  """Sort key: parameters before statistics, then input-to-output order of the modules, so
  the first problem reported is where the file and the model start to disagree."""
  collection, top, *rest = path.split("/")
  m = re.fullmatch(r"(denseblock|transition)(\d+)", top)
  rank = {"conv0": 0, "norm0": 1, "norm_final": 10**6, "classifier": 10**6 + 1}.get(top, -1)
  if m:
    rank = 2 * int(m[2]) + (m[1] == "transition")
  numbers = [int(n) for n in re.findall(r"\d+", "/".join(rest))]
  return (collection != "params", rank, numbers, path)


def guarded(read: Callable[[], T], path: pathlib.Path, what: str) -> T:
  """Runs a reader; any failure inside a file format library becomes one clear ValueError."""
  try:
    return read()
  except Exception as e:  # zip, pickle, HDF5, safetensors, EOF and OS errors: a bad file
    raise ValueError(f"Cannot read {path} as {what}: {type(e).__name__}: {e}. "
                     f"Is the file complete and of that kind?") from e


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of an .npz, read eagerly so that a corrupt member fails here."""
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def existing(path: PathLike) -> pathlib.Path:
  """The path, or a FileNotFoundError that names it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No such weight file: {path}")
  return path


def to_numpy(value: Any) -> np.ndarray:
  """An array from numpy, jax or (detached, CPU) torch tensors, as float32."""
  if hasattr(value, "detach"):  # a torch tensor handed over in memory
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def describe(weights: Any) -> str:
  """A short name for error messages: the file path, or 'in memory'."""
  return str(weights) if isinstance(weights, (str, os.PathLike)) else "(in memory)"
