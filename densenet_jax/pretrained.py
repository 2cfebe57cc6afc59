"""Pretrained ImageNet weights from torchvision and keras.applications, with parity checks.

Each converter reads a weight file, renames every tensor to the Flax variable path it
belongs to (the Flax names already follow torchvision), transposes where the layouts differ,
and checks name by name and shape by shape against the model's abstract variables
(`jax.eval_shape` of `init`): a missing, unexpected or misshapen tensor raises a ValueError
naming it. The converted checkpoint is a single `.npz` of '/'-joined variable paths
('params/conv0/kernel', 'batch_stats/norm0/mean', ...) plus a JSON metadata entry, so

    model, variables = pretrained.load("densenet121.npz")
    logits = model.apply(variables, images)   # NHWC, ImageNet-normalised (IMAGENET_MEAN/STD)

rebuilds the right model, including the BatchNorm epsilon of the source framework
(torchvision 1e-5, Keras 1.001e-5).

Published ImageNet weights: torchvision densenet121/161/169/201 (e.g. densenet121-a639ec97.pth,
with pre-2017 'norm.1'-style keys, remapped here as torchvision does) and keras.applications
DenseNet121/169/201 (densenet121_weights_tf_dim_ordering_tf_kernels[_notop].h5).

Layouts: torch convolutions are OIHW and Flax's HWIO; torch Linear stores (out, in) and
Flax Dense (in, out); Keras already uses HWIO and (in, out). BatchNorm weight/gamma ->
params scale, bias/beta -> params bias, running_mean/moving_mean -> batch_stats mean,
running_var/moving_variance -> batch_stats var.

Training after import differs from torch in one documented way: torch updates running_var
with the unbiased batch variance (times n/(n-1), n = batch * height * width), Flax with the
biased one. Inference, parameter gradients and the running mean are unaffected.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import zipfile
from typing import Any, Callable, Mapping, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from densenet_jax import models

Flat = dict[str, np.ndarray]  # '/'-joined Flax variable path -> array
Variables = dict[str, Any]
PathLike = str | os.PathLike
T = TypeVar("T")

SOURCES = ("torchvision", "keras")
BN_EPSILON = {"torchvision": 1e-5, "keras": 1.001e-5}
# torchvision's ImageNet normalisation; keras.applications.densenet.preprocess_input uses
# mode='torch', which is the same (pixels / 255, then these mean and std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FORMAT = "densenet-jax-pretrained"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"

# torchvision's own remap for checkpoints saved before 2017 ('norm.1' -> 'norm1').
_OLD_TORCHVISION_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

_KERAS_FIXED = {"conv1_conv": "conv0", "conv1_bn": "norm0", "bn": "norm_final",
                "predictions": "classifier", "fc1000": "classifier"}  # fc1000: keras 2.1 name
_KERAS_DENSE_LAYER = re.compile(r"^conv(\d+)_block(\d+)_([012])_(bn|conv)$")
_KERAS_TRANSITION = re.compile(r"^pool(\d+)_(bn|conv)$")
_KERAS_LAYER_PART = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2",
                     ("2", "conv"): "conv2"}
_KERAS_VARIABLE = {"kernel": ("params", "kernel"), "bias": ("params", "bias"),
                   "gamma": ("params", "scale"), "beta": ("params", "bias"),
                   "moving_mean": ("batch_stats", "mean"),
                   "moving_variance": ("batch_stats", "var")}
_KERAS_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


# --------------------------------------------------------------------------- torchvision

def read_torchvision(path: PathLike) -> dict[str, np.ndarray]:
  """Reads a torchvision state_dict from .pth/.pt (needs torch), .safetensors or .npz."""
  path = _existing(path)
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError("Reading .safetensors needs the 'safetensors' package: "
                        "pip install 'densenet-jax[weights]'.") from e
    return _guarded(lambda: dict(load_file(str(path))), path, "a torchvision state_dict")
  if suffix == ".npz":
    return _guarded(lambda: _read_npz(path), path, "a torchvision state_dict")
  if suffix in _TORCH_SUFFIXES:
    return _read_torch(path)
  raise ValueError(f"Unknown torchvision weight format {suffix!r} for {path}: use "
                   f"{'/'.join(_TORCH_SUFFIXES)} (needs torch), .safetensors or .npz.")


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  """torch.load with weights_only (no arbitrary unpickling); torch is imported lazily."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"Reading {path.name} needs PyTorch (pip install torch), or save the "
                      f"state_dict as .safetensors or .npz elsewhere and convert that.") from e
  obj = _guarded(lambda: torch.load(path, map_location="cpu", weights_only=True), path,
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


def torchvision_to_flat(state_dict: Mapping[str, Any]) -> tuple[Flat, dict[str, str]]:
  """Renames and transposes a torchvision state_dict; also returns Flax path -> source key."""
  flat, origin = {}, {}
  for source_key, value in state_dict.items():
    key = _OLD_TORCHVISION_KEY.sub(r"\1\2", source_key)
    key = key.removeprefix("module.")  # nn.DataParallel checkpoints
    if key.endswith("num_batches_tracked"):
      continue  # torch's momentum=None bookkeeping; Flax has no counterpart
    value = _to_numpy(value)
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


def from_torchvision(weights: PathLike | Mapping[str, Any],
                     model: str | models.DenseNet) -> tuple[models.DenseNet, Variables]:
  """(model, variables) from a torchvision state_dict or its file; checks every tensor."""
  state_dict = read_torchvision(weights) if isinstance(weights, (str, os.PathLike)) else weights
  flat, origin = torchvision_to_flat(state_dict)
  what = f"torchvision weights {_describe(weights)}"
  return _build(flat, origin, model, BN_EPSILON["torchvision"], what)


# --------------------------------------------------------------------------------- keras

def read_keras(path: PathLike) -> dict[str, dict[str, np.ndarray]]:
  """Reads Keras weights (.weights.h5, legacy .h5 or a .keras archive): layer -> var -> array."""
  import h5py  # a dependency of keras itself; only needed on this route

  path = _existing(path)

  def read() -> dict[str, dict[str, np.ndarray]] | None:
    if zipfile.is_zipfile(path):  # a .keras archive holds model.weights.h5
      with zipfile.ZipFile(path) as archive:
        source: Any = io.BytesIO(archive.read("model.weights.h5"))
    else:
      source = path
    with h5py.File(source, "r") as f:
      if isinstance(f.get("layers"), h5py.Group):
        return _read_keras3(f["layers"])
      root = f["model_weights"] if "model_weights" in f else f  # model.save() vs save_weights()
      return _read_keras_legacy(root) if "layer_names" in root.attrs else None

  layers = _guarded(read, path, "Keras weights")
  if layers is None:
    raise ValueError(f"{path} is an HDF5 file but not Keras weights: it has neither a "
                     f"'layers' group (Keras 3 .weights.h5) nor a 'layer_names' attribute "
                     f"(legacy .h5).")
  return layers


def _read_keras3(layers: Any) -> dict[str, dict[str, np.ndarray]]:
  """Keras 3 layout: layers/<class-based key>/vars/<0, 1, ...>, the layer name as an attr."""
  out, unnamed = {}, {}
  for key in layers:
    group = layers[key].get("vars")
    if group is None or len(group) == 0:
      continue
    values = [group[str(i)][()] for i in range(len(group))]
    names = _KERAS_BN_ORDER if key.startswith("batch_normalization") else ("kernel", "bias")
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


def _read_keras_legacy(root: Any) -> dict[str, dict[str, np.ndarray]]:
  """Keras 2 / legacy HDF5: layer_names attr, each group's weight_names attr."""
  out = {}
  for layer in (_text(n) for n in root.attrs["layer_names"]):
    group = root[layer]
    weights = {}
    for weight_name in (_text(n) for n in group.attrs.get("weight_names", [])):
      # 'conv1/conv/kernel:0' (Keras 2) or 'conv1_conv/kernel' (Keras 3) -> 'kernel'
      weights[weight_name.split("/")[-1].split(":")[0]] = group[weight_name][()]
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
  if layer in _KERAS_FIXED:
    return _KERAS_FIXED[layer]
  if m := _KERAS_DENSE_LAYER.match(layer):
    block, index, part, kind = m.groups()
    if (part, kind) in _KERAS_LAYER_PART:
      return f"denseblock{int(block) - 1}/denselayer{index}/{_KERAS_LAYER_PART[part, kind]}"
  if m := _KERAS_TRANSITION.match(layer):
    block, kind = m.groups()
    return f"transition{int(block) - 1}/{'norm' if kind == 'bn' else 'conv'}"
  return layer


def keras_to_flat(weights: Mapping[str, Mapping[str, Any]],
                  model: models.DenseNet) -> tuple[Flat, dict[str, str]]:
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
      collection, name = _KERAS_VARIABLE.get(var, ("params", var))
      path = f"{collection}/{module}/{name}"
      flat[path], origin[path] = _to_numpy(value), f"{layer}/{var}"
  return flat, origin


def from_keras(weights: PathLike | Mapping[str, Mapping[str, Any]],
               model: str | models.DenseNet) -> tuple[models.DenseNet, Variables]:
  """(model, variables) from keras.applications DenseNet weights; checks every tensor."""
  layers = read_keras(weights) if isinstance(weights, (str, os.PathLike)) else weights
  # Only layer order matters before the model is known, so a preset name suffices here.
  shape_model = models.get_model(model) if isinstance(model, str) else model
  flat, origin = keras_to_flat(layers, shape_model)
  what = f"Keras weights {_describe(weights)}"
  return _build(flat, origin, model, BN_EPSILON["keras"], what)


# ------------------------------------------------------------------- checking, save, load

def abstract_variables(model: models.DenseNet) -> dict[str, jax.ShapeDtypeStruct]:
  """The model's variables as flat '/'-paths -> shape/dtype, without allocating them."""
  shape = models.native_input_shape(model)
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  return traverse_util.flatten_dict(tree, sep="/")


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


def save(path: PathLike, model_name: str, model: models.DenseNet, variables: Variables,
         source: str, source_file: str = "") -> dict[str, Any]:
  """Writes the converted checkpoint (atomically) and returns its metadata."""
  metadata = {"format": FORMAT, "version": FORMAT_VERSION, "model": model_name,
              "num_classes": model.num_classes, "bn_epsilon": model.bn_epsilon,
              "source": source, "source_file": source_file,
              "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
  arrays = {k: np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  arrays[METADATA_KEY] = np.array(json.dumps(metadata))
  path = pathlib.Path(path)
  # Write beside the target and rename, so an interrupted run never leaves half a file.
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return metadata


def read_checkpoint(path: PathLike) -> tuple[dict[str, Any], Flat]:
  """(metadata, flat arrays) of a converted checkpoint, with clear errors for bad files."""
  path = _existing(path)
  arrays = _guarded(lambda: _read_npz(path), path, "a densenet-jax checkpoint")
  if METADATA_KEY not in arrays:
    raise ValueError(f"{path} is not a densenet-jax checkpoint (no {METADATA_KEY!r} entry); "
                     f"convert weights first: python -m densenet_jax.convert --help")
  metadata = _guarded(lambda: json.loads(str(arrays.pop(METADATA_KEY))), path,
                      "a densenet-jax checkpoint")
  if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {metadata.get('format')!r} version "
                     f"{metadata.get('version')!r}; this code reads {FORMAT!r} "
                     f"version {FORMAT_VERSION}.")
  return metadata, arrays


def load(path: PathLike, **overrides: Any) -> tuple[models.DenseNet, Variables]:
  """(model, variables) from a converted checkpoint; overrides must keep variable shapes."""
  model, variables, _ = load_with_metadata(path, **overrides)
  return model, variables


def load_with_metadata(path: PathLike, **overrides: Any
                       ) -> tuple[models.DenseNet, Variables, dict[str, Any]]:
  """`load` plus the checkpoint's metadata (model, source, bn_epsilon, mean, std, ...)."""
  metadata, flat = read_checkpoint(path)
  stored = dict(num_classes=metadata["num_classes"], bn_epsilon=metadata["bn_epsilon"])
  model = models.get_model(metadata["model"], **stored)
  variables = check_and_unflatten(flat, model, f"checkpoint {path}", metadata["model"])
  # Overrides such as dtype, features_only or memory_efficient reuse the same variables.
  return models.get_model(metadata["model"], **(stored | overrides)), variables, metadata


def convert(source: str, weights: PathLike, out: PathLike,
            model_name: str | None = None) -> dict[str, Any]:
  """Converts a torchvision or Keras weight file into a checkpoint at `out`; its metadata."""
  if source not in SOURCES:
    raise ValueError(f"Unknown source {source!r}: use one of {SOURCES}.")
  if model_name is None:  # infer it from the file's block layout
    model_name = _guess_from_file(source, weights)
  if source == "torchvision":
    model, variables = from_torchvision(weights, model_name)
  else:
    model, variables = from_keras(weights, model_name)
  return save(out, model_name, model, variables, source, pathlib.Path(weights).name)


# ------------------------------------------------------------------------------ helpers

def _build(flat: Flat, origin: dict[str, str], model: str | models.DenseNet,
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


def _guess_from_file(source: str, weights: PathLike) -> str:
  """The preset a weight file was saved from, or a ValueError asking for --model."""
  if source == "torchvision":
    flat, _ = torchvision_to_flat(read_torchvision(weights))
  else:
    flat = {keras_module_path(layer) + "/kernel": v["kernel"]
            for layer, v in read_keras(weights).items() if "kernel" in v}
    flat = {"params/" + k: v for k, v in flat.items()}
  guess = guess_model(flat)
  if guess is None or guess not in models.list_models():
    raise ValueError(f"Cannot tell which DenseNet {weights} holds ({guess or 'no dense '
                     'layers found'}); name it with --model.")
  return guess


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


def _guarded(read: Callable[[], T], path: pathlib.Path, what: str) -> T:
  """Runs a reader; any failure inside a file format library becomes one clear ValueError."""
  try:
    return read()
  except Exception as e:  # zip, pickle, HDF5, safetensors, EOF and OS errors: a bad file
    raise ValueError(f"Cannot read {path} as {what}: {type(e).__name__}: {e}. "
                     f"Is the file complete and of that kind?") from e


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every array of an .npz, read eagerly so that a corrupt member fails here."""
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def _existing(path: PathLike) -> pathlib.Path:
  """The path, or a FileNotFoundError that names it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"No such weight file: {path}")
  return path


def _to_numpy(value: Any) -> np.ndarray:
  """An array from numpy, jax or (detached, CPU) torch tensors, as float32."""
  if hasattr(value, "detach"):  # a torch tensor handed over in memory
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def _text(value: Any) -> str:
  """h5py attributes come back as str or bytes depending on how they were written."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _describe(weights: Any) -> str:
  """A short name for error messages: the file path, or 'in memory'."""
  return str(weights) if isinstance(weights, (str, os.PathLike)) else "(in memory)"
