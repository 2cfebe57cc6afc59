"""The trainer run for real on CPU: tiny on-disk CIFAR-10, fake devices, SIGTERM, digits."""

import dataclasses
import json
import re
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from densenet_jax import backends, models
from train import checkpointing, compilation, input_pipeline, train
from train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(tmp_path, **overrides):
  """BC net with one layer per block on a tiny on-disk CIFAR-10: compiles in seconds."""
  c = default.get_config()
  c.model_overrides = {"depth": 10, "growth_rate": 4}
  c.data_dir = str(tmp_path / "tfds")
  c.image_size = 32
  c.batch_size = 8
  c.eval_batch_size = 16
  c.num_epochs = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.lr_boundaries = ()
  c.shuffle_buffer = 64
  c.compilation_cache_dir = ""  # one test turns it on; the others compile as they always did
  for k, v in overrides.items():
    c[k] = v
  return c


def read_metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(workdir):
  """The steps of the committed checkpoints in a workdir, oldest first."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def saved_params(workdir, step):
  ckpt = checkpointing.Checkpointer(pathlib.Path(workdir).resolve(), 1, 10)
  restored = ckpt.manager.restore(step)
  ckpt.close()
  return restored["state"]


def test_train_on_tiny_cifar10_writes_metrics_checkpoints_and_config(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  half_written = workdir / "checkpoints" / "9.orbax-checkpoint-tmp"  # a save killed mid-way
  half_written.mkdir(parents=True)
  _, metrics = train.train_and_evaluate(tiny_config(tmp_path), str(workdir))
  assert not half_written.exists()
  assert metrics["examples"] == 40  # every test example exactly once
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
  lines = read_metrics(workdir)
  train_lines = [l for l in lines if l["kind"] == "train"]
  assert [l["step"] for l in train_lines] == [1, 2, 3, 4, 5]  # 40 examples / batch 8
  assert all(np.isfinite(l["loss"]) and l["learning_rate"] == 0.1 for l in train_lines)
  assert lines[-1]["kind"] == "eval" and lines[-1]["step"] == 5
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 5]
  assert json.loads((workdir / "config.json").read_text())["model"] == "densenet_bc_100"
  assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, tiny_cifar10):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=7), str(straight))
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=3), str(resumed))
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=7), str(resumed))
  a, b = saved_params(straight, 7), saved_params(resumed, 7)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The resumed run crossed an epoch boundary (5 steps/epoch) with the same data order.
  straight_losses = [l["loss"] for l in read_metrics(straight) if l["kind"] == "train"]
  resumed_losses = [l["loss"] for l in read_metrics(resumed) if l["kind"] == "train"]
  assert straight_losses == resumed_losses


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, tiny_cifar10, caplog):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=4), str(workdir))
  for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "d" in f.parent.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate the array data
  _, metrics = train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=4), str(workdir))
  assert "is damaged" in caplog.text and "falling back" in caplog.text
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints_corrupt").iterdir()] == ["4"]
  # Resumed from step 2: steps 3 and 4 were trained again and step 4 saved anew.
  assert [l["step"] for l in read_metrics(workdir) if l["kind"] == "train"][-2:] == [3, 4]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4]


def test_eval_only_without_checkpoint_says_what_to_do(tmp_path, tiny_cifar10):
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint.*Train first"):
    train.train_and_evaluate(tiny_config(tmp_path, eval_only=True), str(tmp_path / "empty"))


def test_missing_data_fails_fast_with_staging_instructions(tmp_path, monkeypatch):
  monkeypatch.setattr(input_pipeline, "_can_reach", lambda url: False)
  for download in (False, True):
    start = time.time()
    with pytest.raises(input_pipeline.DataMissingError,
                       match=r"(?s)cifar10.*not prepared.*cifar-10-binary.tar.gz.*manual_dir"):
      train.train_and_evaluate(tiny_config(tmp_path, download=download), str(tmp_path / "w"))
    assert time.time() - start < 10


def test_wrong_image_size_is_refused_before_training(tmp_path, tiny_cifar10):
  with pytest.raises(ValueError, match=r"images are \(32, 32\).*--config.image_size=32"):
    train.train_and_evaluate(tiny_config(tmp_path, image_size=16), str(tmp_path / "w"))


@pytest.mark.slow
def test_divergence_stops_before_checkpointing_garbage(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  with pytest.raises(FloatingPointError,
                     match=r"diverged by step \d+: mean loss=.*(nan|inf).*checkpoint"):
    train.train_and_evaluate(tiny_config(tmp_path, learning_rate=1e30), str(workdir))
  for step in (workdir / "checkpoints").iterdir():
    for leaf in jax.tree_util.tree_leaves(saved_params(workdir, int(step.name))):
      assert np.all(np.isfinite(leaf))


def _run_worker(tmp_path, devices, block="concatenating"):
  out = tmp_path / f"step_{devices}_{block}.npz"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO))
  subprocess.run([sys.executable, str(REPO / "tests" / "_step_worker.py"), str(out), block],
                 check=True, env=env, cwd=REPO, timeout=600)
  return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("block", ["concatenating", "buffer"])
def test_eight_device_step_equals_one_device_step(tmp_path, block):
  # the one-buffer block's custom VJP inside shard_map, against the 1-device concatenating step
  one, eight = _run_worker(tmp_path, 1), _run_worker(tmp_path, 8, block)
  assert one.pop("devices") == 1 and eight.pop("devices") == 8
  assert one.keys() == eight.keys()
  worst = max(float(np.max(np.abs(one[k] - eight[k]) / (np.abs(one[k]) + 1e-3))) for k in one)
  print(f"8-device vs 1-device max relative difference: {worst:.2e}")
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=2e-5, atol=2e-6, err_msg=k)


def digits_command(workdir, data_dir, *extra):
  """`python -m train.main` on the digits config: the command the CLI tests run."""
  return [sys.executable, "-m", "train.main", "--config", "configs/digits_bc.py",
          "--workdir", str(workdir), f"--config.data_dir={data_dir}", *extra]


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(digits_command(workdir, tmp_path / "tfds", "--config.log_every_steps=1",
                               "--config.checkpoint_every_steps=1000"),
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (
      (workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "SIGTERM" in err
  saved = checkpoint_steps(workdir)
  # The only save is the SIGTERM one (interval 1000).
  assert len(saved) == 1 and 3 <= saved[0] < 220
  stopped = saved[-1]
  assert max(l["step"] for l in read_metrics(workdir)) == stopped
  rerun = subprocess.run(digits_command(workdir, tmp_path / "tfds", "--config.num_train_steps",
                              str(stopped + 2), "--config.log_every_steps=1"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr
  steps = [l["step"] for l in read_metrics(workdir) if l["kind"] == "train"]
  assert steps[-2:] == [stopped + 1, stopped + 2]


@pytest.mark.slow
def test_digits_demo_reaches_98_percent(tmp_path):
  start = time.time()
  result = subprocess.run(digits_command(tmp_path / "run", tmp_path / "tfds"), cwd=REPO,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr
  accuracy = float(result.stdout.split("Final test accuracy: ")[1].split()[0])
  print(f"digits demo: test accuracy {accuracy:.4f} in {time.time() - start:.0f} s")
  assert accuracy >= 0.98
  assert "(360 examples)" in result.stdout


@pytest.mark.slow
def test_fine_tuning_starts_from_pretrained_weights(tmp_path, tiny_cifar10):
  from densenet_jax import models, pretrained  # pylint: disable=g-import-not-at-top
  source = models.densenet40(num_classes=100, bn_epsilon=1.001e-5)
  variables = jax.jit(lambda x: source.init(jax.random.key(7), x))(np.zeros((1, 32, 32, 3)))
  path = tmp_path / "pretrained.npz"
  pretrained.save(path, "densenet40", source, variables, source="keras")
  config = tiny_config(tmp_path, init_from=str(path), num_train_steps=1, learning_rate=0.0,
                       weight_decay=0.0, model="densenet40")
  config.model_overrides = {}
  state, _ = train.train_and_evaluate(config, str(tmp_path / "run"))
  flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0))
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(state.params), flat(variables["params"])
  assert got.keys() == want.keys()
  for k in got:
    if "classifier" in k:
      assert got[k].shape[-1] == 10 and want[k].shape[-1] == 100  # re-initialised for CIFAR-10
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)  # lr 0: still the loaded weights
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["init_from"] == str(path)

  config.model = "densenet_bc_100"
  config.model_overrides = {"depth": 10, "growth_rate": 4}
  with pytest.raises(ValueError, match=r"init_from=.*densenet40 whose .* is"):
    train.train_and_evaluate(config, str(tmp_path / "other"))


@pytest.mark.slow
def test_step_builds_without_tensorflow_tfds_clu_or_ml_collections():
  code = """
import sys, types
for name in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections"):
  sys.modules[name] = None  # any import of them now fails
import jax, numpy as np
from train import step as train
config = types.SimpleNamespace(seed=0, label_smoothing=0.0, weight_decay=1e-4, momentum=0.9,
    nesterov=True, learning_rate=0.1, lr_schedule="piecewise", lr_boundaries=(0.5,),
    lr_decay=0.1, warmup_epochs=0.0, model_overrides={"depth": 10, "growth_rate": 4},
    init_from="", model="densenet_bc_100", half_precision=False, memory_efficient=False,
    sync_batchnorm=False)
model = train.create_model(config, num_classes=10, channels=3)
tx = train.create_optimizer(config, train.learning_rate_fn(config, 10, 100))
mesh = train.make_mesh()
state = train.create_train_state(model, tx, (2, 16, 16, 3), jax.random.key(0))
batch = train.global_batch(mesh, {"image": np.ones((2, 16, 16, 3), np.float32),
                                  "label": np.array([1, 2])})
state, metrics = train.make_train_step(model, tx, config, mesh)(state, batch)
print("step", int(state.step), float(metrics["loss"]) > 0)
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("step 1 True")


@pytest.mark.slow
def test_relaunch_loads_both_steps_from_the_compilation_cache(tmp_path, tiny_cifar10, capsys):
  cache = tmp_path / "jax_cache"
  try:
    train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=2,
                                         compilation_cache_dir=str(cache)), str(tmp_path / "a"))
    first = capsys.readouterr().out
    assert "Compiled the train step in" in first and "compilation cache" not in first, first
    assert any(cache.iterdir())
    # A relaunch (here: resuming to a later step) loads the eval step. (XLA:CPU cannot
    # serialize the oneDNN calls of the CPU train step, so that one is compiled again here.)
    train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=3,
                                         compilation_cache_dir=str(cache)), str(tmp_path / "a"))
    out = capsys.readouterr().out
    assert re.search(r"Compiled the eval step in [\d.]+ s \(loaded from the compilation "
                     r"cache\)", out), out
  finally:
    compilation.disable_cache()


@pytest.mark.slow
def test_start_up_summary_and_resume_are_announced(tmp_path, tiny_cifar10, capsys):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=2), str(workdir))
  out = capsys.readouterr().out
  for line in ("model     densenet_bc_100 (depth=10, growth_rate=4), 2,666 parameters",
               "data      cifar10: 40 train (train) / 40 eval (test), 10 classes",
               "devices   1 process(es) x 1 cpu device(s) = 1",
               "batch     8 global, 8 per process, 8 per device; eval 16",
               "steps     5 per epoch, 2 in total", "Compiling the eval step...",
               "Compiling the train step...", "Compiled the train step in "):
    assert line in out, out
  assert "Resumed" not in out
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=2), str(workdir))
  assert "Run already complete at step 2; evaluating." in capsys.readouterr().out
  # The final evaluation is recorded once; the rerun's is marked as a repeat.
  kinds = [json.loads(line)["kind"] for line in (workdir / "metrics.jsonl").open()]
  assert kinds.count("eval") == 1 and kinds[-1] == "reeval", kinds
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=3), str(workdir))
  out = capsys.readouterr().out
  assert "Resumed from step 2 of 3." in out
  assert "learning-rate schedule differs" in out and "total steps 2 -> 3" in out


def test_throughput_counts_the_time_until_the_window_results_are_ready(monkeypatch):
  # Steps run asynchronously: a window's time must end when its results exist, not when the
  # last step was dispatched. Here reading each result takes 0.1 s.
  def slow_host(x):
    time.sleep(0.1)
    return np.asarray(x)

  monkeypatch.setattr(train, "_host", slow_host)
  run = types.SimpleNamespace(config=types.SimpleNamespace(batch_size=10),
                              lr_fn=lambda step: 0.1)
  window = [{"loss": np.float32(1.0), "grad_norm": np.float32(2.0)}] * 2
  scalars = train._window_scalars(run, window, time.time(), step=2, last_checkpoint=None)
  assert scalars["loss"] == 1.0 and scalars["grad_norm"] == 2.0
  assert 20 / 5 <= scalars["images_per_second"] <= 20 / 0.4  # 4 reads of 0.1 s, 20 images


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_of_smoothed_one_hot_targets(smoothing):
  logits = jax.random.normal(jax.random.key(0), (6, 7)).astype(jnp.bfloat16)
  labels = jnp.array([0, 6, 3, 3, 1, 2])
  # Label smoothing a: 1 - a on the label, a spread evenly over all K classes.
  targets = (1 - smoothing) * jax.nn.one_hot(labels, 7) + smoothing / 7
  expected = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
  got = step_lib.cross_entropy(logits, labels, smoothing)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_eval_step_sums_only_unmasked_examples():
  model = models.densenet_bc(depth=10, growth_rate=4, num_classes=7)
  mesh = step_lib.make_mesh()
  state = step_lib.create_train_state(model, optax.sgd(0.1), (2, 16, 16, 3), jax.random.key(0))
  eval_step = step_lib.make_eval_step(model, mesh)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 4, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 4)).astype(np.int32)
  masks = np.array([[1, 1, 1, 1], [1, 0, 1, 0]], np.float32)  # the last batch's padding
  sums = [eval_step(state, step_lib.global_batch(mesh, {"image": x, "label": y, "mask": m}))
          for x, y, m in zip(images, labels, masks)]
  total = {k: float(sums[0][k] + sums[1][k]) for k in sums[0]}
  keep = masks.reshape(-1) > 0
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       images.reshape(-1, 16, 16, 3))[keep]
  y = labels.reshape(-1)[keep]
  assert total["count"] == 6
  np.testing.assert_allclose(total["loss"], np.sum(step_lib.cross_entropy(logits, y)), rtol=1e-5)
  assert total["top1"] == np.sum(np.argmax(logits, -1) == y)
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert total["top5"] == np.sum(np.any(top5 == y[:, None], -1))


def test_cpu_step_compiles_with_onednn_and_gives_the_same_result(monkeypatch):
  config = types.SimpleNamespace(seed=0, label_smoothing=0.0, weight_decay=1e-4, momentum=0.9,
                                 nesterov=True)
  model = models.get_model("densenet_bc_100", depth=16, growth_rate=8, num_classes=10)
  tx = step_lib.create_optimizer(config, 0.1)
  mesh = step_lib.make_mesh()
  rng = np.random.default_rng(0)
  batch = step_lib.global_batch(mesh, {"image": rng.standard_normal((8, 16, 16, 3), np.float32),
                                       "label": rng.integers(0, 10, 8).astype(np.int32)})
  results = {}
  for name, options in (("onednn", backends.FAST_PATHS["cpu"]), ("plain", dataclasses.replace(
      backends.FAST_PATHS["cpu"], compiler_options={}))):
    monkeypatch.setitem(backends.FAST_PATHS, "cpu", options)
    state = step_lib.create_train_state(model, tx, (8, 16, 16, 3), jax.random.key(0))
    step = step_lib.make_train_step(model, tx, config, mesh)
    compiled = step.lower(state, batch).compile()  # compiled once, inspected and run
    hlo = compiled.as_text()
    results[name] = (hlo.count('custom_call_target="__onednn$convolution"'),
                     hlo.count(" convolution("), compiled(state, batch))
  # Every convolution (forward, input and weight gradients) is a oneDNN call; none is left
  # to XLA's or YNNPACK's convolution emitters. The plain step has no oneDNN call.
  # 7 3x3 convolutions (stem + 2 per block): forward and weight gradient each, input
  # gradient for all but the stem's.
  assert results["onednn"][:2] == (3 * 7 - 1, 0), results["onednn"][:2]
  assert results["plain"][0] == 0 and results["plain"][1] > 0
  chex.assert_trees_all_close(results["onednn"][2], results["plain"][2], rtol=1e-5, atol=1e-6)
