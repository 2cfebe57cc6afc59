"""Every config field checked before anything compiles or is written; batch sizes per device."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from configs import default
from densenet_jax import models
from train import errors

if TYPE_CHECKING:
  import ml_collections


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every invalid field of the config, each as 'field=value: what is allowed' (the values
  configs/default.py FIELDS allows, and the checks that span fields)."""
  bad = [name for name, field in default.FIELDS.items()
         if name in config and not _passes(field.allowed, config[name])]
  found = [_problem(config, name) for name in bad]
  if not {"model", "model_overrides"} & set(bad):
    try:
      models.get_model(config.model, **dict(config.model_overrides))
    except (TypeError, ValueError) as e:
      found.append(f"--config.model_overrides={dict(config.model_overrides)!r}: {e}")
  if not {"mean", "std"} & set(bad) and len(config.mean) != len(config.std):
    found.append(_problem(config, "mean"))
  return found


def _problem(config: ml_collections.ConfigDict, name: str) -> str:
  return f"--config.{name}={config[name]!r}: must be {default.FIELDS[name].allowed.text}"


def _passes(allowed: default.Allowed, value: Any) -> bool:
  """Whether `value` is allowed; a value of the wrong shape (a number for a tuple) is not."""
  try:
    return bool(allowed.test(value))
  except (TypeError, ValueError):
    return False


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
  """(steps per epoch, total steps) over `num_train` examples, or a ConfigError if no step fits
  or the run (or its warmup) has more steps than an int32 counts."""
  steps_per_epoch = num_train // config.batch_size
  if steps_per_epoch == 0:
    raise errors.ConfigError(
        f"config.batch_size={config.batch_size} exceeds the {num_train} training "
        f"examples of {config.dataset}:{config.train_split}.")
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  epochs = default.LARGEST_COUNT // steps_per_epoch
  for field, steps in (("num_epochs", total_steps), ("warmup_epochs",
                                                     config.warmup_epochs * steps_per_epoch)):
    if steps > default.LARGEST_COUNT:
      raise errors.ConfigError(
          f"--config.{field}={config[field]} is {steps:,.0f} steps of {steps_per_epoch} "
          f"(the examples of {config.dataset}:{config.train_split} / batch_size), more than the "
          f"{default.LARGEST_COUNT:,} a run can count: use at most {epochs:,} epochs.")
  return steps_per_epoch, total_steps
