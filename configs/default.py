"""Shared defaults: the paper's CIFAR recipe (section 4.2). Other configs override fields.

Every field is declared once, in FIELDS: its default, what it means and which values it allows.
`python -m train.main --print_config` and `--help` print them, and train.validation checks a
config against them before anything is written.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_collections

from densenet_jax import imagenet, models

CIFAR10_MEAN = (125.3, 123.0, 113.9)  # per-channel, pixel scale 0..255
CIFAR10_STD = (63.0, 62.1, 66.7)
CIFAR100_MEAN = (129.3, 124.1, 112.4)
CIFAR100_STD = (68.2, 65.4, 70.4)
IMAGENET_MEAN = imagenet.MEAN_255
IMAGENET_STD = imagenet.STD_255

# Steps, epochs and batch sizes end up in int32: the step counter of the state, the arguments of
# the jitted step and schedule, tf.data's sizes. A larger count fails deep inside a run.
LARGEST_COUNT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Allowed:
  """The values a field allows: a test of one value, and the words for it."""

  test: Callable[[Any], bool]
  text: str


def _integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flag() -> Allowed:
  """True or False."""
  return Allowed(lambda v: isinstance(v, bool), "True or False")


def one_of(*choices: str) -> Allowed:
  """One of `choices`."""
  return Allowed(lambda v: v in choices, f"one of {', '.join(choices)}")


def count(special: int | None = None, meaning: str = "") -> Allowed:
  """A positive integer up to LARGEST_COUNT, or `special` (which means `meaning`)."""
  words = f"a positive integer up to {LARGEST_COUNT}"
  if special is not None:
    words = f"{special} ({meaning}) or {words}"
  return Allowed(lambda v: _integer(v) and (0 < v <= LARGEST_COUNT or v == special), words)


def number(low: float, high: float = math.inf, low_open: bool = False) -> Allowed:
  """A finite number in [low, high), or (low, high) with `low_open`."""
  return Allowed(lambda v: _finite(v) and (v > low if low_open else v >= low) and v < high,
                 f"a finite number in {'(' if low_open else '['}{low:g}, {high:g})")


def text(words: str, empty: bool = True, none: bool = False) -> Allowed:
  """A string (not '' unless `empty`; or None with `none`)."""
  return Allowed(lambda v: (v is None and none) or (isinstance(v, str) and (empty or bool(v))),
                 words)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field: its default here, its meaning, the values it allows."""

  default: Any
  meaning: str
  allowed: Allowed


FIELDS: dict[str, Field] = {
    # Model: a densenet_jax preset and keyword overrides of its attributes.
    "model": Field("densenet_bc_100", "a densenet_jax preset", one_of(*models.list_models())),
    "model_overrides": Field(
        {"drop_rate": 0.0}, "keyword overrides of the preset's attributes",
        Allowed(lambda v: hasattr(v, "keys"),
                "attributes of the preset, e.g. {'depth': 40} (checked by building the model)")),
    "memory_efficient": Field(
        False, "recompute concat+BN+ReLU in the backward pass: memory linear in depth", flag()),
    "sync_batchnorm": Field(
        False, "BatchNorm statistics over the global batch instead of per device", flag()),
    "half_precision": Field(
        False, "bfloat16 compute; params, BN statistics and the loss stay float32", flag()),
    # Data (tensorflow_datasets).
    "dataset": Field("cifar10", "a tensorflow_datasets name (sklearn_digits: the offline demo)",
                     text("a tensorflow_datasets name", empty=False)),
    "data_dir": Field(None, "tfds data directory (None: ~/tensorflow_datasets or $TFDS_DATA_DIR)",
                      text("a directory path or None", none=True)),
    "download": Field(True, "let tfds download and prepare the dataset when it is missing",
                      flag()),
    "manual_dir": Field(None, "a folder holding the dataset's original archive(s), for offline "
                        "staging", text("a directory path or None", none=True)),
    "train_split": Field("train", "tfds split to train on",
                         text("a tfds split, slicing such as 'train[:90%]' works", empty=False)),
    "eval_split": Field("test", "tfds split to evaluate on",
                        text("a tfds split, slicing such as 'test[:50%]' works", empty=False)),
    "image_size": Field(32, "training and evaluation image side in pixels", count()),
    "augment": Field("cifar", "none; cifar: pad 4, random crop, flip; imagenet: random resized "
                     "crop, flip", one_of("none", "cifar", "imagenet")),
    "mean": Field(CIFAR10_MEAN, "per-channel mean subtracted from 0..255 pixels ((0,) and std "
                  "(255,): pixels / 255)",
                  Allowed(lambda v: len(v) >= 1 and all(_finite(m) for m in v),
                          "finite numbers, as many as std (one per channel, or one for all)")),
    "std": Field(CIFAR10_STD, "per-channel std the centred pixels are divided by",
                 Allowed(lambda v: len(v) >= 1 and all(_finite(s) and s > 0 for s in v),
                         "positive finite numbers")),
    "shuffle_buffer": Field(50_000, "examples per shuffle window (whole 256-example blocks; 2 "
                            "windows held in RAM)", count()),
    "input_threads": Field(0, "tf.data threads per host",
                           count(0, "automatic: every core with an accelerator, else 2")),
    # Optimisation: SGD, Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 / 10 at 50% and 75%.
    "batch_size": Field(64, "global batch over all devices and processes (must divide by the "
                        "devices)", count()),
    "eval_batch_size": Field(500, "global eval batch; rounded up to a multiple of the device "
                             "count", count()),
    "num_epochs": Field(300, "epochs to train (the lr schedule spans them)", count()),
    "num_train_steps": Field(-1, "stop after this many steps instead (smoke tests)",
                             count(-1, "train for num_epochs")),
    "learning_rate": Field(0.1, "peak learning rate", number(0)),
    "momentum": Field(0.9, "SGD momentum (0: plain SGD)", number(0, 1)),
    "nesterov": Field(True, "Nesterov momentum", flag()),
    "weight_decay": Field(1e-4, "L2 weight decay added to the gradient (torch-style, every "
                          "parameter)", number(0)),
    "lr_schedule": Field("piecewise", "piecewise: x lr_decay at lr_boundaries (paper); cosine",
                         one_of("piecewise", "cosine")),
    "lr_boundaries": Field(
        (0.5, 0.75), "fractions of training where the piecewise schedule decays",
        Allowed(lambda v: all(_finite(b) and 0 < b < 1 for b in v) and list(v) == sorted(v),
                "increasing fractions of training in (0, 1), e.g. (0.5, 0.75)")),
    "lr_decay": Field(0.1, "factor applied at each boundary", number(0, low_open=True)),
    "warmup_epochs": Field(0.0, "linear warmup from 0 over this many epochs",
                           number(0, LARGEST_COUNT)),
    "label_smoothing": Field(0.0, "label smoothing of the training loss", number(0, 1)),
    # Bookkeeping.
    "seed": Field(0, "seeds the initialisation, data order, augmentation and dropout",
                  Allowed(lambda v: _integer(v) and -2**63 <= v < 2**63, "a 64-bit integer")),
    "log_every_steps": Field(100, "steps between logged training metrics", count()),
    "eval_every_epochs": Field(1, "epochs between evaluations (and always at the end)", count()),
    "checkpoint_every_steps": Field(1000, "steps between checkpoints (and at the end and on "
                                    "SIGTERM, SIGHUP, SIGQUIT or Ctrl-C)", count()),
    "keep_checkpoints": Field(3, "how many of the newest checkpoints to keep", count()),
    "async_checkpoints": Field(True, "write checkpoints in the background while training goes "
                               "on", flag()),
    "eval_only": Field(False, "evaluate the newest checkpoint of --workdir without training",
                       flag()),
    "init_from": Field("", "pretrained weights to start from (fine-tuning)",
                       text("'' (none), a registered name such as densenet121, or a "
                            "`python -m densenet_jax.convert` .npz")),
    "compilation_cache_dir": Field(
        "~/.cache/densenet_jax/jax_compilation_cache", "JAX's persistent compilation cache, "
        "shared by runs on this host: a relaunch loads its compiled steps",
        text("a directory path, or '' to turn the cache off")),
}

# One line per field, shown by `--print_config`: what it means; which values it allows.
HELP = {name: f"{field.meaning}; {field.allowed.text}" for name, field in FIELDS.items()}


def get_config() -> ml_collections.ConfigDict:
  """DenseNet-BC-100 (k=12) on CIFAR-10+ with the paper's recipe."""
  c = ml_collections.ConfigDict()
  for name, field in FIELDS.items():
    if field.default is None:  # an optional path: a command-line string may replace it
      c[name] = ml_collections.FieldReference(None, field_type=str)
    elif isinstance(field.default, dict):
      c[name] = ml_collections.ConfigDict(field.default)
    else:
      c[name] = field.default
  return c


def describe_fields() -> str:
  """What `--help` says about the config: one line per field, its meaning and allowed values."""
  width = max(len(name) for name in FIELDS)
  return ("config fields (override any with --config.FIELD=VALUE; --print_config shows a "
          "config's values):\n" + "\n".join(f"  {name:<{width}}  {HELP[name]}" for name in FIELDS))
