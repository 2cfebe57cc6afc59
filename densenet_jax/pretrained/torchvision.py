"""torchvision DenseNet state_dicts (.pth/.pt with torch, .safetensors or .npz without).

torch convolutions are OIHW and Flax's HWIO; torch Linear stores (out, in) and Flax Dense
(in, out). BatchNorm weight -> params scale, bias -> params bias, running_mean/running_var ->
batch_stats mean/var. The published files use pre-2017 'norm.1'-style keys, remapped here as
torchvision does; timm's republished .safetensors keep torchvision's module names.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import numpy as np

from densenet_jax import models
from densenet_jax.pretrained import common

BN_EPSILON = 1e-5
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

# torchvision's own remap for checkpoints saved before 2017 ('norm.1' -> 'norm1').
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def read_torchvision(path: common.PathLike, model: str | models.DenseNet | None = None, *,
                     shapes: bool = False) -> dict[str, np.ndarray]:
  """Reads a torchvision state_dict from .pth/.pt (needs torch), .safetensors or .npz.

  An .npz is checked from its .npy headers first against the size of `model` (the largest
  preset's when not given), so a small compressed file cannot expand to gigabytes.
  shapes=True: only names and shapes are wanted; an .npz then gives zero-byte stand-ins
  without reading any array.
  """
  path = common.existing(path)
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    load_file = common.require("safetensors.numpy", f"Reading {path.name}").load_file
    return common.guarded(lambda: dict(load_file(str(path))), path, "a torchvision state_dict")
  if suffix == ".npz":
    standins = read_shapes(path, model)
    if shapes:
      return standins
    return common.guarded(lambda: common.read_npz(path), path, "a torchvision state_dict")
  if suffix in TORCH_SUFFIXES:
    return _read_torch(path)
  raise ValueError(f"Unknown torchvision weight format {suffix!r} for {path}: use "
                   f"{'/'.join(TORCH_SUFFIXES)} (needs torch), .safetensors or .npz.")


def read_shapes(path: common.PathLike, model: str | models.DenseNet | None = None
                ) -> dict[str, np.ndarray] | None:
  """Zero-byte stand-ins of an .npz state_dict's arrays, from its .npy headers alone (bounded
  by the size of `model`); None for the other formats, which have no such pass."""
  path = common.existing(path)
  if path.suffix.lower() != ".npz":
    return None
  bound, model_name = common.bound_for(model)
  headers = common.guarded(lambda: common.npz_headers(path, bound, model_name), path,
                           "a torchvision state_dict")
  return common.standins(headers, path)


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  """torch.load with weights_only (no arbitrary unpickling); torch is imported lazily."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path.name} needs PyTorch (pip install torch), or save the "
                      f"state_dict as .safetensors or .npz elsewhere and convert that.") from e
  obj = common.guarded(lambda: torch.load(path, map_location="cpu", weights_only=True), path,
                       "a torchvision state_dict")
  # Training checkpoints often wrap the state_dict.
  for key in ("state_dict", "model_state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a torchvision state_dict; "
                     f"save model.state_dict() instead.")
  return {k: v.detach().cpu().float().numpy() for k, v in obj.items()
          if isinstance(v, torch.Tensor) and v.is_floating_point()}


def torchvision_to_flat(state_dict: Mapping[str, Any]) -> tuple[common.Flat, dict[str, str]]:
  """Renames and transposes a torchvision state_dict; also returns Flax path -> source key."""
  flat, origin = {}, {}
  for source_key, value in state_dict.items():
    key = _OLD_KEY.sub(r"\1\2", source_key)
    key = key.removeprefix("module.")  # nn.DataParallel checkpoints
    if key.endswith("num_batches_tracked"):
      continue  # torch's momentum=None bookkeeping; Flax has no counterpart
    value = common.to_numpy(value)
    *modules, leaf = key.split(".")
    if modules[:1] == ["features"]:
      modules = modules[1:]
    if modules == ["norm5"]:
      modules = ["norm_final"]
    collection, name = "params", leaf
    if leaf == "weight" and value.ndim == 4:
      name, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif leaf == "weight" and value.ndim == 2:
      name, value = "kernel", value.T  # (out, in) -> (in, out)
    elif leaf == "weight":
      name = "scale"
    elif leaf == "running_mean":
      collection, name = "batch_stats", "mean"
    elif leaf == "running_var":
      collection, name = "batch_stats", "var"
    path = "/".join([collection, *modules, name])
    flat[path], origin[path] = value, source_key
  return flat, origin
