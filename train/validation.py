"""Every config field checked before anything compiles or is written; batch sizes per device."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from densenet_jax import models
from train import errors

if TYPE_CHECKING:
  import ml_collections

AUGMENTATIONS = ("none", "cifar", "imagenet")
SCHEDULES = ("piecewise", "cosine")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid field of the config, each as 'field=value: what is allowed'."""
  found: list[str] = []

  def need(ok: bool, field: str, allowed: str) -> None:
    if not ok:
      found.append(f"--config.{field}={config[field]!r}: {allowed}")

  def positive_int(field: str) -> None:
    value = config[field]
    need(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
         "must be a positive integer")

  def finite(field: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    value = config[field]
    ok = _number(value) and math.isfinite(value) and (
        value > low if low_open else value >= low) and value < high
    bounds = f"{'(' if low_open else '['}{low}, {high})"
    need(ok, field, f"must be a finite number in {bounds}")

  need(config.model in models.list_models(), "model",
       f"must be one of {', '.join(models.list_models())}")
  if config.model in models.list_models():
    try:
      models.get_model(config.model, **dict(config.model_overrides))
    except (TypeError, ValueError) as e:
      found.append(f"--config.model_overrides={dict(config.model_overrides)!r}: {e}")
  for field in ("memory_efficient", "sync_batchnorm", "half_precision", "download", "nesterov",
                "async_checkpoints", "eval_only"):
    need(isinstance(config[field], bool), field, "must be True or False")
  need(bool(config.dataset), "dataset", "must name a tensorflow_datasets dataset")
  need(config.augment in AUGMENTATIONS, "augment", f"must be one of {AUGMENTATIONS}")
  need(config.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {SCHEDULES}")
  positive_int("image_size")
  need(len(config.mean) == len(config.std) and len(config.mean) >= 1
       and all(_number(m) and math.isfinite(m) for m in config.mean), "mean",
       "must be finite numbers, as many as std (one per channel, or one for all)")
  need(all(_number(s) and math.isfinite(s) and s > 0 for s in config.std), "std",
       "must be positive finite numbers")
  positive_int("shuffle_buffer")
  need(isinstance(config.input_threads, int) and config.input_threads >= 0, "input_threads",
       "must be 0 (automatic) or a positive integer")
  for field in ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_epochs",
                "checkpoint_every_steps", "keep_checkpoints"):
    positive_int(field)
  steps = config.num_train_steps
  need(isinstance(steps, int) and (steps == -1 or steps > 0), "num_train_steps",
       "must be -1 (train for num_epochs) or a positive integer")
  if steps == -1:
    positive_int("num_epochs")
  finite("learning_rate", 0.0)
  finite("momentum", 0.0, 1.0)
  finite("weight_decay", 0.0)
  finite("lr_decay", 0.0, low_open=True)
  finite("warmup_epochs", 0.0)
  finite("label_smoothing", 0.0, 1.0)
  boundaries = tuple(config.lr_boundaries)
  need(all(_number(b) and 0 < b < 1 for b in boundaries)
       and list(boundaries) == sorted(boundaries), "lr_boundaries",
       "must be increasing fractions of training in (0, 1), e.g. (0.5, 0.75)")
  need(isinstance(config.seed, int) and not isinstance(config.seed, bool), "seed",
       "must be an integer")
  need(isinstance(config.get("compilation_cache_dir", ""), str), "compilation_cache_dir",
       "must be a directory path, or '' to turn the cache off")
  return found


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every invalid field (nothing has been written yet)."""
  found = problems(config)
  if found:
    raise errors.ConfigError("Invalid config:\n  " + "\n  ".join(found))


@dataclasses.dataclass(frozen=True)
class Batches:
  """Global and per-process batch sizes for one device layout."""

  train: int
  local_train: int
  eval: int  # config.eval_batch_size rounded up to a multiple of the device count
  local_eval: int


def batches(config: ml_collections.ConfigDict, devices: int, processes: int) -> Batches:
  """Batch sizes for `devices` over `processes`, or a ConfigError with a batch/lr that fit.

  Evaluation pads and masks, so its batch is rounded up to whole devices; a training batch is
  part of the recipe (the learning rate depends on it), so it is never changed silently.
  """
  if config.batch_size % devices:
    fit = max(devices, round(config.batch_size / devices) * devices)
    lr = config.learning_rate * fit / config.batch_size
    raise errors.ConfigError(
        f"--config.batch_size={config.batch_size} does not divide over {devices} devices "
        f"({processes} processes). Use a multiple of {devices}, e.g. --config.batch_size={fit} "
        f"--config.learning_rate={lr:.6g} (the learning rate scaled linearly with the batch).")
  eval_batch = -(-config.eval_batch_size // devices) * devices
  return Batches(train=config.batch_size, local_train=config.batch_size // processes,
                 eval=eval_batch, local_eval=eval_batch // processes)


def run_length(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
  """(steps per epoch, total steps) over `num_train` examples, or a ConfigError if no step fits."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} exceeds the {num_train} training "
        f"examples of {config.dataset}:{config.train_split}.")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  return steps_per_epoch, total_steps
