"""Shipped configs are valid, validation names every bad field, counts fit an int32, batches
fit any device count; each field is declared once (configs/default.py FIELDS) and read from
there by validation, --print_config and --help."""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from configs import default
from train import cli, errors, validation

REPO = pathlib.Path(__file__).resolve().parent.parent

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


@pytest.mark.parametrize("field, value", [
    ("num_epochs", 10**12), ("num_train_steps", 2**31), ("batch_size", 2**31),
    ("eval_batch_size", 2**40), ("checkpoint_every_steps", 2**31), ("log_every_steps", 2**31),
    ("eval_every_epochs", 2**31), ("keep_checkpoints", 2**31), ("shuffle_buffer", 2**31),
    ("image_size", 2**31), ("input_threads", 2**31), ("warmup_epochs", 1e12),
    ("seed", 2**64)])
def test_every_count_fits_the_int32_it_ends_up_in(field, value):
  config = load("default")
  config[field] = value
  found = validation.problems(config)
  assert len(found) == 1 and found[0].startswith(f"--config.{field}=")


def test_a_run_longer_than_an_int32_counts_is_refused_with_the_epochs_that_fit():
  config = load("digits_bc")  # 1437 training digits, batch 64: 22 steps per epoch
  config.num_epochs = default.LARGEST_COUNT
  with pytest.raises(errors.ConfigError, match=r"--config.num_epochs=2147483647 is "
                                               r"47,244,640,234 steps of 22 .* at most "
                                               r"97,612,893 epochs"):
    validation.run_length(config, 1437)
  config.num_epochs, config.warmup_epochs = 10, 2e8
  with pytest.raises(errors.ConfigError, match=r"--config.warmup_epochs=200000000.0 is"):
    validation.run_length(config, 1437)
  config.warmup_epochs = 0.0
  assert validation.run_length(config, 1437) == (22, 220)


def test_each_field_is_declared_once_and_every_reader_uses_it():
  config = load("default")
  assert sorted(config.keys()) == sorted(default.FIELDS)  # get_config is built from the table
  text = cli.describe_config(config)
  fields = default.describe_fields()
  for name, field in default.FIELDS.items():
    assert field.meaning in default.HELP[name] and field.allowed.text in default.HELP[name]
    assert any(l.startswith(f"{name} = ") and default.HELP[name] in l for l in text.splitlines())
    assert f"  {name} " in fields and default.HELP[name] in fields
  # The drift this replaced: init_from's meaning differed between its two descriptions.
  assert "densenet121" in default.HELP["init_from"] and ".npz" in default.HELP["init_from"]
  config.keep_checkpoints = 0
  assert validation.problems(config) == [
      f"--config.keep_checkpoints=0: must be {default.FIELDS['keep_checkpoints'].allowed.text}"]


@pytest.mark.slow
def test_help_lists_every_field_with_its_allowed_values():
  result = subprocess.run([sys.executable, "-m", "train.main", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert default.describe_fields() in result.stdout
