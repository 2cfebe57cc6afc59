"""Shipped configs are valid, validation names every bad field, batches fit any device count."""

import importlib
import pathlib
import re

import pytest

from train import cli, errors, validation

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py")
                 if p.stem != "__init__")
DEVICE_COUNTS = (1, 8, 16, 32, 256)


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def documented_device_counts(name):
  """The device counts a config's docstring promises its training batch divides."""
  doc = importlib.import_module(f"configs.{name}").__doc__
  match = re.search(r"[Dd]evices: ([\d, ]+)", doc)
  assert match, f"configs/{name}.py must say which device counts its batch is meant for"
  return [int(n) for n in match.group(1).replace(" ", "").strip(",").split(",")]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_is_valid(name):
  assert validation.problems(load(name)) == []


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_shipped_config_on_common_device_counts(name, devices):
  config = load(name)
  processes = max(1, devices // 8)
  if config.batch_size % devices == 0:
    b = validation.batches(config, devices, processes)
    assert b.train == config.batch_size and b.local_train * processes == b.train
  else:
    assert devices not in documented_device_counts(name)
    with pytest.raises(errors.ConfigError, match=r"--config.batch_size=(\d+) "
                                                 r"--config.learning_rate=([\d.e-]+)") as e:
      validation.batches(config, devices, processes)
    fit = re.search(r"--config.batch_size=(\d+) --config.learning_rate=([\d.e-]+)", str(e.value))
    config.batch_size, config.learning_rate = int(fit.group(1)), float(fit.group(2))
    b = validation.batches(config, devices, processes)  # the suggestion works
    assert b.train % devices == 0
  # Evaluation pads and masks, so any eval batch works: rounded up to whole devices.
  assert b.eval % devices == 0 and config.eval_batch_size <= b.eval < (
      config.eval_batch_size + devices)
  assert b.local_eval * processes == b.eval


@pytest.mark.parametrize("name", CONFIGS)
def test_documented_device_counts_work(name):
  config = load(name)
  for devices in documented_device_counts(name):
    validation.batches(config, devices, max(1, devices // 8))


@pytest.mark.parametrize("field, value, says", [
    ("augment", "bogus", "must be one of"),
    ("num_epochs", 0, "positive integer"),
    ("num_epochs", -1, "positive integer"),
    ("learning_rate", -0.1, "finite number"),
    ("learning_rate", float("nan"), "finite number"),
    ("learning_rate", float("inf"), "finite number"),
    ("keep_checkpoints", 0, "positive integer"),
    ("log_every_steps", 0, "positive integer"),
    ("checkpoint_every_steps", 0, "positive integer"),
    ("eval_every_epochs", 0, "positive integer"),
    ("num_train_steps", 0, "-1"),
    ("momentum", 1.5, "finite number"),
    ("label_smoothing", 1.0, "finite number"),
    ("lr_boundaries", (0.75, 0.5), "increasing"),
    ("lr_schedule", "linear", "must be one of"),
    ("std", (0.0, 1.0, 1.0), "positive"),
    ("model", "densenet_bogus", "must be one of"),
    ("input_threads", -1, "automatic"),
])
def test_validation_names_the_field_and_what_is_allowed(field, value, says):
  config = load("default")
  config[field] = value
  found = validation.problems(config)
  assert len(found) == 1 and found[0].startswith(f"--config.{field}=") and says in found[0]


def test_validation_reports_every_problem_at_once():
  config = load("default")
  config.augment, config.batch_size, config.model_overrides = "x", 0, {"depth": 11}
  with pytest.raises(errors.ConfigError) as e:
    validation.validate(config)
  text = str(e.value)
  assert "augment" in text and "batch_size" in text and "(L-4)/6" in text


def test_print_config_explains_every_field():
  config = load("cifar_bc")
  text = cli.describe_config(config)
  lines = text.splitlines()
  assert len(lines) == len(config.keys())
  assert all("  # " in line for line in lines), [l for l in lines if "  # " not in l]
  assert any(l.startswith("batch_size = 64") and "global batch" in l for l in lines)
