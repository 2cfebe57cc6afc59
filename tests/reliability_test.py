"""A run never loses, clobbers or poisons its state: each failure of the reliability issue, replayed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import checkpointing, errors, preemption, train, workdir as workdir_lib
from train_test import (REPO, checkpoint_steps, digits_command, read_metrics, saved_params,
                        tiny_config)


def all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.inexact))


@pytest.mark.slow
def test_changed_config_is_refused_and_nothing_is_moved(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=4), str(workdir))
  before = checkpoint_steps(workdir)
  changed = tiny_config(tmp_path, num_train_steps=5)
  changed.model_overrides = {"depth": 10, "growth_rate": 8}
  with pytest.raises(errors.IncompatibleCheckpointError,
                     match=r"(?s)differently configured.*model_overrides.*growth_rate.*4.*8.*"
                           r"Nothing was changed.*new --workdir"):
    train.train_and_evaluate(changed, str(workdir))
  assert checkpoint_steps(workdir) == before == [2, 4]
  assert not (workdir / "checkpoints_corrupt").exists()
  # The original command still resumes where it stopped.
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=5), str(workdir))
  assert [l["step"] for l in read_metrics(workdir) if l["kind"] == "train"][-2:] == [4, 5]


def _save(directory, step, state, meta):
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  manager.close()


def test_content_that_differs_from_its_digest_is_quarantined(tmp_path, caplog):
  good = {"w": jnp.arange(64, dtype=jnp.float32), "step": jnp.int32(3)}
  flipped = {"w": good["w"].at[17].set(np.nextafter(np.float32(17), np.float32(99))),
             "step": good["step"]}
  record, _ = checkpointing.array_record(good)
  identity = {"model": "m"}
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  ckpt.save(1, good, {"identity": identity})
  ckpt.close()
  # Step 2's bytes differ from the digests recorded for it by one ulp of one element: what a
  # flipped bit on disk that still decodes looks like.
  _save(tmp_path / "checkpoints", 2, flipped, {"identity": identity, "arrays": record})
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  state, meta = ckpt.restore(jax.eval_shape(lambda: good), identity)
  ckpt.close()
  assert "do not match their saved digests (e.g. ['w'])" in caplog.text
  np.testing.assert_array_equal(state["w"], good["w"])
  assert [p.name.split(".")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["2"]


@pytest.mark.slow
def test_flipped_bit_on_disk_falls_back_to_the_previous_step(tmp_path, tiny_cifar10, caplog):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=4), str(workdir))
  step2 = saved_params(workdir, 2)
  files = [f for f in (workdir / "checkpoints" / "4" / "state").rglob("*")
           if f.is_file() and "/d/" in str(f)]
  largest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(largest.read_bytes())
  # 16 flipped bits spread over the middle of the file. (A single flip can land on bytes no
  # array is read from; the digests then prove the restored state intact, which is correct.)
  for i in range(16):
    data[len(data) // 10 + i * (len(data) * 8 // 10) // 16] ^= 0x10
  largest.write_bytes(bytes(data))
  state, _ = train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=4, eval_only=False),
                                      str(workdir))
  assert "Checkpoint step 4" in caplog.text and "is damaged" in caplog.text
  assert [p.name.split(".")[0] for p in (workdir / "checkpoints_corrupt").iterdir()] == ["4"]
  train_steps = [l["step"] for l in read_metrics(workdir) if l["kind"] == "train"]
  assert train_steps[-2:] == [3, 4]  # resumed from step 2 and retrained 3..4
  assert all_finite(step2)


def test_a_workdir_whose_checkpoints_were_all_quarantined_does_not_start_over(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  (tmp_path / "checkpoints_corrupt" / "4.1700000000").mkdir(parents=True)
  with pytest.raises(errors.CheckpointError, match=r"No intact checkpoint.*new --workdir"):
    ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, {})
  ckpt.close()


@pytest.mark.slow
def test_late_divergence_is_not_checkpointed_and_fails(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  # lr x1e12 from step 4 of 5: the final state is non-finite (or absurd) at the last step.
  config = tiny_config(tmp_path, num_train_steps=5, lr_boundaries=(0.75,), lr_decay=1e12,
                       log_every_steps=100)
  with pytest.raises(errors.DivergedError,
                     match=r"diverged.*newest checkpoint \(step (2|4)\) is finite"):
    train.train_and_evaluate(config, str(workdir))
  assert 5 not in checkpoint_steps(workdir)
  for step in checkpoint_steps(workdir):
    assert all_finite(saved_params(workdir, step)), step


def test_nonfinite_state_is_never_saved(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  ckpt.save(1, {"w": jnp.ones(3)}, {})
  with pytest.raises(errors.DivergedError, match=r"step 2 holds non-finite.*\['w'\].*step 1"):
    ckpt.save(2, {"w": jnp.array([1.0, jnp.nan, 0.0])}, {})
  ckpt.close()
  assert checkpoint_steps(tmp_path) == [1]


def _hold_lock(path):
  code = ("import sys, time; from etils import epath; from train import workdir; "
          "lock = workdir.hold(epath.Path(sys.argv[1])); lock.__enter__(); "
          "print('locked', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert holder.stdout.readline().strip() == "locked"
  return holder


def test_second_run_on_a_workdir_fails_at_once_naming_the_holder(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = _hold_lock(workdir)
  try:
    start = time.time()
    with pytest.raises(errors.WorkdirError,
                       match=rf"in use by another run \(pid {holder.pid} on host .*started"):
      train.train_and_evaluate(tiny_config(tmp_path), str(workdir))
    assert time.time() - start < 30  # before compiling anything
    assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = _hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdir_lib.hold(tmp_path):
    assert f"no longer alive (pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
  assert (tmp_path / "LOCK").read_text() == ""  # released: a later run names no dead holder


@pytest.mark.slow
def test_each_launch_keeps_its_config_and_eval_only_writes_none(tmp_path, tiny_cifar10):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=2), str(workdir))
  train.train_and_evaluate(tiny_config(tmp_path, num_train_steps=3), str(workdir))
  history = sorted((workdir / "configs").iterdir())
  assert len(history) == 2
  assert [json.loads(p.read_text())["num_train_steps"] for p in history] == [2, 3]
  latest = (workdir / "config.json").read_text()
  assert json.loads(latest)["num_train_steps"] == 3
  _, metrics = train.train_and_evaluate(
      tiny_config(tmp_path, num_train_steps=3, eval_only=True, learning_rate=0.5), str(workdir))
  assert metrics["examples"] == 40
  assert (workdir / "config.json").read_text() == latest  # describes the run that trained
  assert len(list((workdir / "configs").iterdir())) == 2


def _cli(workdir, data_dir, *extra):
  return digits_command(workdir, data_dir, "--config.model_overrides.depth=10", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("flag", [
    "--config.augment=bogus", "--config.num_epochs=0", "--config.num_epochs=-1",
    "--config.learning_rate=-0.1", "--config.learning_rate=nan", "--config.keep_checkpoints=0",
    "--config.log_every_steps=0", "--config.checkpoint_every_steps=0",
    "--config.eval_every_epochs=0", "--config.model=densenet_bogus",
    "--config.num_epochs=1000000000000"])
def test_cli_rejects_bad_values_in_one_line_before_writing(tmp_path, flag):
  workdir = tmp_path / "run"
  start = time.time()
  result = subprocess.run(_cli(workdir, tmp_path / "tfds", flag), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  field = flag.split("=")[0]
  assert result.stderr.startswith("error: Invalid config:") and field in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()  # validated before anything was written
  assert time.time() - start < 60  # no compile


@pytest.mark.slow
@pytest.mark.parametrize("path,says", [("missing.npz", "No such weight file"),
                                       (".", "is a directory, not a weight file")])
def test_cli_init_from_a_path_that_is_no_weight_file_is_one_line(tmp_path, path, says):
  result = subprocess.run(_cli(tmp_path / "run", tmp_path / "tfds",
                               f"--config.init_from={tmp_path / path}"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith("error: --config.init_from:") and says in result.stderr
  assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_cli_run_longer_than_an_int32_counts_is_one_line_before_writing(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(_cli(workdir, tmp_path / "tfds", "--config.num_epochs=2147483647"),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert re.fullmatch(r"error: --config.num_epochs=2147483647 is [\d,]+ steps of 22 \(.*\), "
                      r"more than the 2,147,483,647 a run can count: use at most 97,612,893 "
                      r"epochs.\n", result.stderr), result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_cli_eval_only_without_checkpoints_is_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  result = subprocess.run(_cli(workdir, tmp_path / "tfds", "--config.eval_only=True"),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  assert result.stderr == (f"error: eval_only: no checkpoint in {workdir / 'checkpoints'}. "
                           f"Train first, or point --workdir at a finished run.\n")


def test_cli_sigterm_during_start_up_says_so(tmp_path):
  proc = subprocess.Popen(_cli(tmp_path / "run", tmp_path / "tfds"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().startswith("Writing scikit-learn's")  # start-up, not training
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143
  assert err.startswith("error: SIGTERM during start-up") and "Traceback" not in err


def test_sigterm_swallowed_during_start_up_still_stops_before_training():
  notice = preemption.Preemption()
  try:
    class Finalizer:
      def __del__(self):  # Python ignores exceptions raised in __del__, the handler's included
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10_000))  # bytecode for the handler to run in
    Finalizer()
    with pytest.raises(preemption.Preempted, match="SIGTERM during start-up"):
      notice.start_training()
  finally:
    notice.close()


@pytest.mark.slow
def test_cli_divergence_exits_nonzero_without_a_traceback(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(_cli(workdir, tmp_path / "tfds", "--config.learning_rate=1e6",
                               "--config.checkpoint_every_steps=1",
                               "--config.num_train_steps=30"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.startswith("error: Training diverged") and "Traceback" not in result.stderr
  for step in checkpoint_steps(workdir):
    assert all_finite(saved_params(workdir, step)), step


@pytest.fixture
def small_disk(tmpfs):
  return tmpfs("disk", "600k")


_NOISE = """
import asyncio, sys, threading
from train import main, preemption
main._quiet()
loop = asyncio.new_event_loop()
loop.close()
class Callback:  # what tensorstore's threads do once orbax has closed its loop
  def __del__(self):
    loop.call_soon_threadsafe(print)
class Bug:
  def __del__(self):
    raise RuntimeError("a real bug")
class SignalInCallback:  # a Ctrl-C handler that ran inside a GC callback: raised again later
  def __del__(self):
    raise preemption.Interrupted("Stopped by Ctrl-C before the first training step")
def drop(obj):
  del obj
for obj in (Callback(), Bug(), SignalInCallback()):
  t = threading.Thread(target=drop, args=(obj,))
  del obj
  t.start(); t.join()
"""


def test_swallowed_callback_errors_are_hidden_and_real_errors_are_not():
  # tensorstore reports it through sys.unraisablehook, not sys.excepthook: a bare traceback
  # that used to lead the full-disk message one run in four.
  result = subprocess.run([sys.executable, "-c", _NOISE], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Event loop is closed" not in result.stderr
  assert "Interrupted" not in result.stderr and "Stopped by Ctrl-C" not in result.stderr
  assert "RuntimeError: a real bug" in result.stderr


@pytest.mark.slow
def test_cli_full_disk_is_one_clear_message(tmp_path, small_disk):
  result = subprocess.run(_cli(small_disk / "run", tmp_path / "tfds",
                               "--config.checkpoint_every_steps=1", "--config.num_train_steps=40",
                               "--config.keep_checkpoints=100"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.startswith("error: The disk holding --workdir")
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]  # no traceback
  steps = checkpoint_steps(small_disk / "run")
  assert steps  # what was saved before the disk filled is complete and restores
  assert all_finite(saved_params(small_disk / "run", steps[-1]))


def test_checkpoint_size_estimate_covers_a_real_checkpoint(tmp_path):
  # Random values: orbax compresses, and the estimate is for arrays that do not compress.
  state = {"w": jax.random.normal(jax.random.key(0), (300, 100)), "b": jnp.arange(7),
           "step": jnp.int32(3)}
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  ckpt.save(1, state, {"identity": {}})
  ckpt.close()
  on_disk = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "1").rglob("*")
                if f.is_file())
  estimate = checkpointing.checkpoint_bytes(jax.eval_shape(lambda: state))
  assert on_disk <= estimate <= 3 * on_disk + (128 << 10), (on_disk, estimate)


def test_too_little_free_space_fails_before_restoring_naming_free_and_needed(tmp_path,
                                                                              monkeypatch):
  abstract = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}
  needed = checkpointing.checkpoint_bytes(abstract)
  usage = lambda free: lambda path: types.SimpleNamespace(total=10 * needed, used=0, free=free)
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", usage(needed - 1))
  ckpt = checkpointing.Checkpointer(tmp_path, 1, 5, asynchronous=False)
  with pytest.raises(errors.DiskFullError,
                     match=rf"has {needed - 1:,} bytes free, but a checkpoint of this run needs "
                           rf"about {needed:,}. Free space"):
    ckpt.restore(abstract, {})
  monkeypatch.setattr(checkpointing.shutil, "disk_usage", usage(needed))
  assert ckpt.restore(abstract, {}) is None  # room for one checkpoint: the run may start
  ckpt.close()


@pytest.mark.slow
def test_cli_rerun_on_a_still_full_disk_fails_before_compiling(tmp_path, small_disk):
  args = ("--config.checkpoint_every_steps=1", "--config.num_train_steps=40",
          "--config.keep_checkpoints=100")
  first = subprocess.run(_cli(small_disk / "run", tmp_path / "tfds", *args), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 1 and "full" in first.stderr, first.stderr[-2000:]
  again = subprocess.run(_cli(small_disk / "run", tmp_path / "tfds", *args), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 1, again.stderr[-2000:]
  # One line either way: from the free-space check, or, when the first run left no byte at
  # all, from writing the launch's config copy (both come before anything compiles).
  assert re.fullmatch(r"error: The disk holding --workdir=\S+ (has [\d,]+ bytes free, but a "
                      r"checkpoint of this run needs about [\d,]+|is full \([^)]*\))\. "
                      r"Free space.*\n", again.stderr), again.stderr[-2000:]
  assert "Compiling" not in again.stdout  # nothing compiled, nothing trained
