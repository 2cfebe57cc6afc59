"""The converted checkpoint: one `.npz` of '/'-joined variable paths ('params/conv0/kernel',
'batch_stats/norm0/mean', ...) plus a JSON metadata entry (model, num_classes, bn_epsilon,
source, mean/std), written atomically; and `convert`, from a source file to that format."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from flax import traverse_util

from densenet_jax import imagenet, models
from densenet_jax.pretrained import common, sources

FORMAT = "densenet-jax-pretrained"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"


def save(path: common.PathLike, model_name: str, model: models.DenseNet,
         variables: common.Variables, source: str, source_file: str = "") -> dict[str, Any]:
  """Writes the converted checkpoint (atomically) and returns its metadata."""
  metadata = {"format": FORMAT, "version": FORMAT_VERSION, "model": model_name,
              "num_classes": model.num_classes, "bn_epsilon": model.bn_epsilon,
              "source": source, "source_file": source_file,
              "mean": list(imagenet.MEAN), "std": list(imagenet.STD)}
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


_MAX_METADATA_CHARS = 1 << 16  # the metadata is a few hundred characters of JSON


def read(path: common.PathLike) -> tuple[dict[str, Any], common.Flat]:
  """(metadata, flat arrays) of a converted checkpoint file, with clear errors for bad files.

  The .npy headers are checked against the model the metadata names before any array is
  read, so a small compressed file cannot claim gigabytes of memory.
  """
  path = common.existing(path)
  what = "a densenet-jax checkpoint"
  headers = common.guarded(lambda: common.npz_headers(path, *common.bound_for(None)), path,
                           what)
  if METADATA_KEY not in headers:
    raise ValueError(f"{path} is not a densenet-jax checkpoint (no {METADATA_KEY!r} entry); "
                     f"convert weights first: python -m densenet_jax.convert --help")
  shape, dtype = headers.pop(METADATA_KEY)
  if shape != () or dtype.kind != "U" or dtype.itemsize > 4 * _MAX_METADATA_CHARS:
    raise common.Refused(f"{path}: the {METADATA_KEY!r} entry is a {dtype} array of shape "
                         f"{shape}, not a short JSON string: refused before reading it.")
  metadata = common.guarded(lambda: _read_metadata(path), path, what)
  if metadata.get("format") != FORMAT or metadata.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format {metadata.get('format')!r} version "
                     f"{metadata.get('version')!r}; this code reads {FORMAT!r} "
                     f"version {FORMAT_VERSION}.")
  model = common.guarded(lambda: _model(metadata), path, what)
  common.check_fits(common.standins(headers, path), model, f"checkpoint {path}",
                    metadata["model"])
  arrays = common.guarded(lambda: common.read_npz(path), path, what)
  arrays.pop(METADATA_KEY)
  return metadata, arrays


def _read_metadata(path: pathlib.Path) -> dict[str, Any]:
  with np.load(path, allow_pickle=False) as npz:
    metadata = json.loads(str(npz[METADATA_KEY]))
  if not isinstance(metadata, dict):
    raise ValueError(f"{METADATA_KEY!r} holds a JSON {type(metadata).__name__}, not an object")
  return metadata


def _model(metadata: dict[str, Any], **overrides: Any) -> models.DenseNet:
  """The model a checkpoint's metadata describes, with `overrides` of its attributes."""
  stored = dict(num_classes=metadata["num_classes"], bn_epsilon=metadata["bn_epsilon"])
  return models.get_model(metadata["model"], **(stored | overrides))


def load(path: common.PathLike, **overrides: Any
         ) -> tuple[models.DenseNet, common.Variables, dict[str, Any]]:
  """(model, variables, metadata) from a checkpoint file; overrides must keep shapes."""
  metadata, flat = read(path)
  variables = common.check_and_unflatten(flat, _model(metadata), f"checkpoint {path}",
                                         metadata["model"])
  # Overrides such as dtype, features_only or memory_efficient reuse the same variables.
  return _model(metadata, **overrides), variables, metadata


def convert(source: str, weights: common.PathLike, out: common.PathLike,
            model_name: str | None = None) -> dict[str, Any]:
  """Converts a torchvision or Keras weight file into a checkpoint at `out`; its metadata."""
  if model_name is None:  # infer it from the file's block layout
    model_name = sources.guess_from_file(source, weights)
  model, variables = sources.variables(source, weights, model_name)
  return save(out, model_name, model, variables, source, pathlib.Path(weights).name)

