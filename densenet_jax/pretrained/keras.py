"""keras.applications DenseNet weights (.weights.h5, legacy .h5, .keras); needs h5py only.

Keras already uses HWIO convolutions and (in, out) dense kernels, so only names change:
gamma/beta -> params scale/bias, moving_mean/moving_variance -> batch_stats mean/var.
"""

from __future__ import annotations

import io
import pathlib
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from densenet_jax import models
from densenet_jax.pretrained import common

BN_EPSILON = 1.001e-5

_FIXED = {"conv1_conv": "conv0", "conv1_bn": "norm0", "bn": "norm_final",
          "predictions": "classifier", "fc1000": "classifier"}  # fc1000: keras 2.1 name
_DENSE_LAYER = re.compile(r"^conv(\d+)_block(\d+)_([012])_(bn|conv)$")
_TRANSITION = re.compile(r"^pool(\d+)_(bn|conv)$")
_LAYER_PART = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2",
               ("2", "conv"): "conv2"}
_VARIABLE = {"kernel": ("params", "kernel"), "bias": ("params", "bias"),
             "gamma": ("params", "scale"), "beta": ("params", "bias"),
             "moving_mean": ("batch_stats", "mean"),
             "moving_variance": ("batch_stats", "var")}
_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


def read_keras(path: common.PathLike, model: str | models.DenseNet | None = None
               ) -> dict[str, dict[str, np.ndarray]]:
  """Reads Keras weights (.weights.h5, legacy .h5 or a .keras archive): layer -> var -> array.

  Sizes are checked before anything is expanded or read: the archive member's and every
  HDF5 dataset's, against common.size_bound of `model` (the largest preset when not given).
  """
  h5py = common.require("h5py", "Reading Keras weights")
  path = common.existing(path)
  bound, model_name = common.bound_for(model)
  budget = _Budget(bound, path, model_name)

  def read() -> dict[str, dict[str, np.ndarray]] | None:
    if zipfile.is_zipfile(path):  # a .keras archive holds model.weights.h5
      with zipfile.ZipFile(path) as archive:
        # The declared size, which zipfile also enforces while inflating: a small archive
        # cannot expand past it.
        size = archive.getinfo("model.weights.h5").file_size
        if size > bound:
          raise common.Refused(
              f"{path} holds model.weights.h5 of {size} bytes once expanded, more than the "
              f"{bound} that weights of {model_name} can need: refused before extracting it.")
        source: Any = io.BytesIO(archive.read("model.weights.h5"))
    else:
      source = path
    with h5py.File(source, "r") as f:
      if isinstance(f.get("layers"), h5py.Group):
        return _read_keras3(f["layers"], budget)
      root = f["model_weights"] if "model_weights" in f else f  # model.save() vs save_weights()
      return _read_legacy(root, budget) if "layer_names" in root.attrs else None

  layers = common.guarded(read, path, "Keras weights")
  if layers is None:
    raise ValueError(f"{path} is an HDF5 file but not Keras weights: it has neither a "
                     f"'layers' group (Keras 3 .weights.h5) nor a 'layer_names' attribute "
                     f"(legacy .h5).")
  return layers


class _Budget:
  """The bytes HDF5 datasets may add up to; checked from each dataset's shape before reading
  it (a compressed dataset can expand to any size)."""

  def __init__(self, bound: int, path: pathlib.Path, model_name: str):
    self.left, self.bound, self.path, self.model_name = bound, bound, path, model_name

  def read(self, dataset: Any) -> np.ndarray:
    self.left -= int(np.prod(dataset.shape)) * dataset.dtype.itemsize
    if self.left < 0:
      raise common.Refused(f"{self.path} holds datasets of more than {self.bound} bytes, more "
                           f"than weights of {self.model_name} can need: refused before "
                           f"reading them ({dataset.name} has shape {dataset.shape}).")
    return dataset[()]


def _read_keras3(layers: Any, budget: _Budget) -> dict[str, dict[str, np.ndarray]]:
  """Keras 3 layout: layers/<class-based key>/vars/<0, 1, ...>, the layer name as an attr."""
  out, unnamed = {}, {}
  for key in layers:
    group = layers[key].get("vars")
    if group is None or len(group) == 0:
      continue
    values = [budget.read(group[str(i)]) for i in range(len(group))]
    names = _BN_ORDER if key.startswith("batch_normalization") else ("kernel", "bias")
    weights = dict(zip(names, values))
    name = _text(group.attrs["name"]) if "name" in group.attrs else None
    if name is None:  # files from Keras < 3.10 carry no names: keep the order instead
      kind, _, index = key.rpartition("_") if key[-1].isdigit() else (key, "", "0")
      unnamed.setdefault(kind, []).append((int(index), weights))
    else:
      out[name] = weights
  for kind, entries in unnamed.items():
    for i, (_, weights) in enumerate(sorted(entries, key=lambda e: e[0])):
      out[f"<{kind} #{i}>"] = weights  # resolved against the model in keras_to_flat
  return out


def _read_legacy(root: Any, budget: _Budget) -> dict[str, dict[str, np.ndarray]]:
  """Keras 2 / legacy HDF5: layer_names attr, each group's weight_names attr."""
  out = {}
  for layer in (_text(n) for n in root.attrs["layer_names"]):
    group = root[layer]
    weights = {}
    for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
      # 'conv1/conv/kernel:0' (Keras 2) or 'conv1_conv/kernel' (Keras 3) -> 'kernel'
      weights[weight_name.split("/")[-1].split(":")[0]] = budget.read(group[weight_name])
    if weights:
      out[layer] = weights
  return out


def keras_layer_names(model: models.DenseNet) -> dict[str, list[str]]:
  """keras.applications layer names with weights, per layer class, in creation order."""
  convs, norms = ["conv1_conv"], ["conv1_bn"]
  for b, num_layers in enumerate(model.block_config):
    for l in range(1, num_layers + 1):
      norms += [f"conv{b + 2}_block{l}_0_bn", f"conv{b + 2}_block{l}_1_bn"]
      convs += [f"conv{b + 2}_block{l}_1_conv", f"conv{b + 2}_block{l}_2_conv"]
    if b < len(model.block_config) - 1:
      norms.append(f"pool{b + 2}_bn")
      convs.append(f"pool{b + 2}_conv")
  return {"batch_normalization": norms + ["bn"], "conv2d": convs, "dense": ["predictions"]}


def keras_module_path(layer: str) -> str:
  """The Flax module path of a keras.applications DenseNet layer (unknown names unchanged)."""
  layer = layer.replace("/", "_")  # Keras 2.1 named the stem 'conv1/conv', 'conv1/bn'
  if layer in _FIXED:
    return _FIXED[layer]
  if m := _DENSE_LAYER.match(layer):
    block, index, part, kind = m.groups()
    if (part, kind) in _LAYER_PART:
      return f"denseblock{int(block) - 1}/denselayer{index}/{_LAYER_PART[part, kind]}"
  if m := _TRANSITION.match(layer):
    block, kind = m.groups()
    return f"transition{int(block) - 1}/{'norm' if kind == 'bn' else 'conv'}"
  return layer


def keras_to_flat(weights: Mapping[str, Mapping[str, Any]],
                  model: models.DenseNet) -> tuple[common.Flat, dict[str, str]]:
  """Renames Keras layer weights to Flax paths; also returns Flax path -> source name."""
  by_order = keras_layer_names(model)
  flat, origin = {}, {}
  for layer, variables in weights.items():
    if m := re.fullmatch(r"<(\w+) #(\d+)>", layer):  # unnamed Keras 3 entry: use the order
      kind, i = m.group(1), int(m.group(2))
      names = by_order.get(kind, [])
      layer = names[i] if i < len(names) else f"{kind}_{i} (beyond the model's {len(names)})"
    module = keras_module_path(layer)
    for var, value in variables.items():
      collection, name = _VARIABLE.get(var, ("params", var))
      path = f"{collection}/{module}/{name}"
      flat[path], origin[path] = common.to_numpy(value), f"{layer}/{var}"
  return flat, origin


def _text(value: Any) -> str:
  """h5py attributes come back as str or bytes depending on how they were written."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
