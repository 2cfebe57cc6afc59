"""What every weight source shares: checking converted variables against the model, guessing
the preset a file holds, and turning reader failures into one clear error."""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
import re
import zipfile
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


class Refused(ValueError):
  """A weight file refused from its headers, before its arrays are read: it does not fit the
  model, or it would expand to far more memory than the model can need."""


def flat_variable_shapes(model: models.DenseNet) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's variables as flat '/'-paths -> shape/dtype, without allocating them."""
  return dict(_flat_variable_shapes(model))


@functools.lru_cache(maxsize=16)
def _flat_variable_shapes(model: models.DenseNet) -> dict[str, jax.ShapeDtypeStruct]:
  # Cached: a load checks headers first and the arrays after, each against the same model.
  tree = models.abstract_variables(model, models.native_input_shape(model))
  return traverse_util.flatten_dict(tree, sep="/")


def variable_bytes(model: models.DenseNet) -> int:
  """The model's variables' size in float32 bytes (computed without allocating them)."""
  return sum(4 * int(np.prod(s.shape)) for s in flat_variable_shapes(model).values())


LARGEST = "densenet264"  # the preset with the most variables: bounds files of unknown model


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
  expected = check_fits(flat, model, what, model_name, origin)
  # device_put, not jnp.asarray (which compiles a small program per distinct shape). On CPU
  # device_put may alias the numpy buffer, and a torch state_dict's numpy views share memory
  # with the live torch model: copy, so a later torch step cannot change these variables.
  return traverse_util.unflatten_dict(
      {k: jax.device_put(np.array(flat[k], np.float32, copy=True)) for k in expected}, sep="/")


def check_fits(flat: Mapping[str, Any], model: models.DenseNet, what: str,
               model_name: str = "the model", origin: Mapping[str, str] | None = None
               ) -> list[str]:
  """The model's variable paths once every path and shape in `flat` (arrays, or anything with
  a .shape) matches them, else Refused naming the first problems."""
  if model.num_classes > MAX_CLASSES:
    raise Refused(f"{what} has a classifier of {model.num_classes} classes, more than the "
                  f"{MAX_CLASSES} this reader accepts: refused before reading its arrays.")
  origin = origin or {}
  abstract = flat_variable_shapes(model)
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
    raise Refused(f"{what} does not fit {model_name} ({len(mismatched)} shape mismatches, "
                  f"{len(unexpected)} unexpected, {len(missing)} missing): "
                  f"{shown}{more}.{hint}")
  return list(expected)


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


def fit_model(flat: Mapping[str, Any], model: str | models.DenseNet, bn_epsilon: float
              ) -> tuple[models.DenseNet, str]:
  """(the model to check the file against, its name in messages); classes from the file."""
  if isinstance(model, str):
    classifier = flat.get("params/classifier/kernel")
    num_classes = 0 if classifier is None else int(classifier.shape[-1])  # 0: headless file
    return models.get_model(model, num_classes=num_classes, bn_epsilon=bn_epsilon), model
  return model.clone(bn_epsilon=bn_epsilon), "the model"


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
  except Refused:
    raise
  except Exception as e:  # zip, pickle, HDF5, safetensors, EOF and OS errors: a bad file
    raise ValueError(f"Cannot read {path} as {what}: {type(e).__name__}: {e}. "
                     f"Is the file complete and of that kind?") from e


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of an .npz, read eagerly so that a corrupt member fails here."""
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def bound_for(model: str | models.DenseNet | None) -> tuple[int, str]:
  """(size_bound of the model, or of the largest preset when None; the model in words)."""
  if model is None:
    return size_bound(LARGEST), f"any preset ({LARGEST}, the largest)"
  return size_bound(model), model if isinstance(model, str) else "the model"


def npz_headers(path: pathlib.Path, max_bytes: int, model_name: str
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """name -> (shape, dtype) of every array of an .npz, from the .npy headers alone.

  Reads a few hundred bytes per member: a compressed member can expand to any size, and
  numpy sizes its buffer from the header, so shapes are checked before any array is read.
  Refused here: a member whose declared size exceeds what its shape needs, and arrays that
  add up to more than max_bytes.
  """
  out, total = {}, 0
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
          shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
          raise ValueError(f"member {info.filename} has .npy format {version}, not 1.0 or 2.0")
        needed = f.tell() + int(np.prod(shape)) * dtype.itemsize
      name = info.filename.removesuffix(".npy")
      if info.file_size > needed:
        raise Refused(f"{path}: member {name!r} declares {info.file_size} bytes, but its shape "
                      f"{shape} of {dtype} needs {needed}: refused before reading it.")
      out[name] = (tuple(shape), dtype)
      total += needed
      if total > max_bytes:
        raise Refused(f"{path} holds arrays of more than {max_bytes} bytes once expanded, more "
                      f"than weights of {model_name} can need: refused before reading them.")
  return out


def standins(headers: Mapping[str, tuple[tuple[int, ...], np.dtype]], path: pathlib.Path
             ) -> Flat:
  """Zero-byte float32 arrays of the headers' shapes, to check names and shapes against a
  model as if they were the arrays (numeric dtypes only; anything else is refused)."""
  out = {}
  for name, (shape, dtype) in headers.items():
    if dtype.kind not in "fiub" or dtype.itemsize > 8:
      raise Refused(f"{path}: array {name!r} has dtype {dtype}, not a number: refused before "
                    f"reading it.")
    out[name] = np.broadcast_to(np.zeros((), np.float32), shape)
  return out


INSTALL_WEIGHTS = "pip install -e '.[weights]'"  # from a checkout, as the README installs


def require(module: str, purpose: str, package: str | None = None) -> Any:
  """Imports an optional dependency of the [weights] extra, or an ImportError naming it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    package = package or module.split(".")[0]
    raise ImportError(f"{purpose} needs the {package!r} package, which the [weights] extra "
                      f"installs: {INSTALL_WEIGHTS} (or pip install {package}).") from e


def existing(path: PathLike) -> pathlib.Path:
  """The path, or a FileNotFoundError (IsADirectoryError for a directory) that names it."""
  path = pathlib.Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{path} is a directory, not a weight file: name the file in it.")
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
