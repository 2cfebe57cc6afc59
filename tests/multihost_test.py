"""Multi-process training with real processes on 127.0.0.1 (CPU devices, gloo collectives)."""

import json
import pathlib
import signal
import sys
import time

import numpy as np
import pytest

from multihost_launch import launch, trainer, wait_all
from train_test import checkpoint_steps

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_multihost_worker.py"
pytestmark = pytest.mark.slow


def flags(tmp_path, workdir, *extra):
  """A depth-10 BC net on 64 digits; global batch = all 64, so every layout sees one batch."""
  return ["--config", "configs/digits_bc.py", f"--config.data_dir={tmp_path / 'tfds'}",
          "--config.model_overrides.depth=10", "--config.batch_size=64",
          "--config.eval_batch_size=120", "--config.log_every_steps=1",
          f"--workdir={workdir}", *extra]


def wait_for_train_lines(metrics, count, timeout=300):
  """Waits until process 0 has logged `count` training steps."""
  deadline = time.time() + timeout
  while time.time() < deadline and not (
      metrics.exists() and metrics.read_text().count('"kind": "train"') >= count):
    time.sleep(0.2)


def test_two_processes_match_one_process(tmp_path):
  common = flags(tmp_path, "{}", "--config.train_split=train[:64]",
                 "--config.num_train_steps=3", "--config.sync_batchnorm=True")
  def cmd(workdir, dump):
    return lambda i, multi: [sys.executable, str(WORKER)] + [
        a.format(workdir) for a in common] + multi + [str(dump(i))]
  one = launch(cmd(tmp_path / "one", lambda i: tmp_path / "one.npz"), 1, 4, tmp_path, "one")
  assert wait_all(one, 400) == [0], (tmp_path / "one0.log").read_text()[-3000:]
  two = launch(cmd(tmp_path / "two", lambda i: tmp_path / f"two{i}.npz"), 2, 2, tmp_path,
               "two")
  assert wait_all(two, 400) == [0, 0], (tmp_path / "two0.log").read_text()[-3000:]

  ref, p0, p1 = (dict(np.load(tmp_path / f)) for f in ("one.npz", "two0.npz", "two1.npz"))
  assert (int(ref.pop("process_count")), int(p0.pop("process_count"))) == (1, 2)
  p1.pop("process_count")
  assert ref["examples"] == p0["examples"] == 360  # the whole test split, exactly once
  keys = [k for k in ref if k.startswith("[")]
  assert keys and keys == [k for k in p0 if k.startswith("[")]
  for k in keys:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)  # the processes agree bitwise
  worst = max(float(np.max(np.abs(ref[k] - p0[k]))) for k in keys)
  print(f"2 processes x 2 devices vs 1 process x 4 devices: max |dparam| = {worst:.3g}")
  for k in keys:
    np.testing.assert_allclose(p0[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Only process 0 writes metrics; the first 3 train lines are the same on both layouts.
  lines = lambda d: [json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
  one_loss = [l["loss"] for l in lines("one") if l["kind"] == "train"]
  two_loss = [l["loss"] for l in lines("two") if l["kind"] == "train"]
  np.testing.assert_allclose(two_loss, one_loss, rtol=1e-5)
  assert len(two_loss) == 3


def test_dead_peer_stops_the_survivor_and_a_relaunch_resumes(tmp_path):
  workdir = tmp_path / "run"
  common = flags(tmp_path, workdir, "--config.num_train_steps=400",
                 "--config.checkpoint_every_steps=5", "--heartbeat_timeout_seconds=10")
  procs = launch(trainer(common), 2, 2, tmp_path, "first")
  metrics = workdir / "metrics.jsonl"
  wait_for_train_lines(metrics, 12)
  deadline = time.time() + 120  # the asynchronous save of step 10 commits in the background
  while time.time() < deadline and not (workdir / "checkpoints" / "10").exists():
    time.sleep(0.2)
  procs[1].kill()
  killed_at = time.time()
  survivor_rc = procs[0].wait(timeout=120)
  took = time.time() - killed_at
  log = (tmp_path / "first0.log").read_text()
  print(f"survivor exited with {survivor_rc} {took:.1f} s after its peer died")
  assert survivor_rc != 0
  assert took < 60  # heartbeat timeout 10 s plus shutdown; never a hang
  assert any(s in log for s in ("gloo", "distributed service", "heartbeat", "Connection")), log[-2000:]

  saved = checkpoint_steps(workdir)
  assert saved and saved[-1] >= 10
  again = launch(trainer(flags(tmp_path, workdir, f"--config.num_train_steps={saved[-1] + 3}")),
                 2, 2, tmp_path, "again")
  assert wait_all(again, 400) == [0, 0], (tmp_path / "again0.log").read_text()[-3000:]
  steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()
           if json.loads(l)["kind"] == "train"]
  assert steps[-3:] == [saved[-1] + 1, saved[-1] + 2, saved[-1] + 3]
  assert "Final test accuracy" in (tmp_path / "again0.log").read_text()


def dump_params(npz):
  data = dict(np.load(npz))
  return {k: v for k, v in data.items() if k.startswith("[")}


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_bit_exact(tmp_path):
  workdir = tmp_path / "run"
  # A constant lr: the runs below differ in length, and the schedule spans the whole run.
  flags_ = lambda *a: flags(tmp_path, *a, "--config.lr_boundaries=()")
  common = flags_(workdir, "--config.train_split=train[:640]",
                 "--config.num_train_steps=200", "--config.checkpoint_every_steps=1000")
  procs = launch(trainer(common), 2, 2, tmp_path, "first")
  metrics = workdir / "metrics.jsonl"
  wait_for_train_lines(metrics, 5)
  procs[1].send_signal(signal.SIGTERM)  # one host is preempted first, as on a pod
  assert wait_all(procs, 200) == [0, 0], (tmp_path / "first0.log").read_text()[-3000:]
  logs = [(tmp_path / f"first{i}.log").read_text() for i in range(2)]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 200
  stopped = saved[0]
  assert f"Checkpointed step {stopped} after a preemption notice" in logs[0]
  assert all(f"checkpointed step {stopped}" in log for log in logs)  # the same step on both
  assert max(json.loads(l)["step"] for l in metrics.read_text().splitlines()) == stopped

  final = stopped + 3
  resume = lambda i, multi: [sys.executable, str(WORKER)] + flags_(
      workdir, "--config.train_split=train[:640]",
      f"--config.num_train_steps={final}") + multi + [str(tmp_path / f"resumed{i}.npz")]
  assert wait_all(launch(resume, 2, 2, tmp_path, "again"), 400) == [0, 0], (
      (tmp_path / "again0.log").read_text()[-3000:])
  assert f"Resumed from step {stopped} of {final}" in (tmp_path / "again0.log").read_text()
  straight = lambda i, multi: [sys.executable, str(WORKER)] + flags_(
      tmp_path / "straight", "--config.train_split=train[:640]",
      f"--config.num_train_steps={final}") + multi + [str(tmp_path / f"straight{i}.npz")]
  assert wait_all(launch(straight, 2, 2, tmp_path, "straight"), 400) == [0, 0]
  resumed, reference = dump_params(tmp_path / "resumed0.npz"), dump_params(
      tmp_path / "straight0.npz")
  assert resumed.keys() == reference.keys() and resumed
  for k in resumed:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


def test_ctrl_c_to_one_process_stops_both_at_one_step(tmp_path):
  workdir = tmp_path / "run"
  common = flags(tmp_path, workdir, "--config.train_split=train[:640]",
                 "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000")
  procs = launch(trainer(common), 2, 2, tmp_path, "first")
  wait_for_train_lines(workdir / "metrics.jsonl", 5)
  procs[1].send_signal(signal.SIGINT)  # passed on to JAX's preemption service
  codes = wait_all(procs, 200)
  logs = [(tmp_path / f"first{i}.log").read_text() for i in range(2)]
  assert codes == [0, 130], logs[1][-3000:]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < 400
  assert f"Checkpointed step {saved[0]} after Ctrl-C; rerun the same command" in logs[1]
  assert f"Checkpointed step {saved[0]} after a preemption notice" in logs[0]
  assert "Traceback" not in logs[1] and "KeyboardInterrupt" not in logs[1]
