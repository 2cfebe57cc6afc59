"""The benchmark suite runs: train_step.py without TensorFlow, memory.py, and the renderer."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)
import memory  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import profile_step  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import render  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import resnet50  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import run_all  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# GPU machines have jax, flax, optax, orbax (and torch), but none of these.
NOT_ON_GPU_MACHINES = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu")


def test_train_step_runs_where_only_jax_flax_optax_exist():
  code = (f"import runpy, sys\n"
          f"for name in {NOT_ON_GPU_MACHINES!r}:\n"
          f"  sys.modules[name] = None  # `import name` raises ImportError\n"
          f"sys.argv = ['train_step.py', '--block-config', '1,1,1', '--batch', '4',\n"
          f"            '--steps', '2', '--warmup', '0']\n"
          f"runpy.run_path({os.path.join(BENCH, 'train_step.py')!r}, run_name='__main__')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert row["bench"] == "train_step" and row["model"] == "densenet_bc_100"
  assert row["batch"] == 4 and row["steps"] == 2
  assert row["img_per_s"] > 0 and row["compile_s"] > 0 and len(row["load_before"]) == 3
  assert row["temp_mib"] > 0 and row["loss"] == row["loss"]  # finite, not NaN


def test_the_reference_resnet50_is_resnet50():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  model = resnet50.ResNet50()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  # torchvision's resnet50 and Keras' ResNet50 have 25,557,032 parameters
  assert sum(p.size for p in jax.tree_util.tree_leaves(variables["params"])) == 25_557_032
  logits, state = model.apply(jax.tree_util.tree_map(jnp.zeros_like, variables),
                              jnp.zeros((2, 64, 64, 3)), train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 1000) and "batch_stats" in state


def test_profile_accounts_for_the_step_by_kind_of_op(capsys):
  row = profile_step.main(["--block-config", "1,1,1", "--batch", "4", "--steps", "1",
                           "--top", "5"])
  capsys.readouterr()
  cats = row["categories"]
  # The tiny BC net still has 3x3 convolutions (oneDNN's on CPU), 1x1 convolutions as
  # matmuls, BN reductions.
  assert {"dot", "reduce fusion"} <= set(cats)
  assert any(c.split()[-1] == "conv3x3" for c in cats), cats
  assert abs(sum(c["s"] for c in cats.values()) - row["thunk_s_per_step"]) < 1e-2
  assert len(row["top_ops"]) == 5 and all(o["ms"] > 0 for o in row["top_ops"])
  assert all(o["mb"] > 0 for o in row["top_ops"])


def test_run_all_runs_the_torch_peers_with_the_interpreter_given(tmp_path, monkeypatch):
  # torch may exist only for another Python than the project's venv: --torch-python picks it.
  fake = tmp_path / "python-with-torch"
  fake.write_text('#!/bin/sh\necho "{\\"bench\\": \\"peer\\", \\"argv\\": \\"$*\\"}"\n')
  fake.chmod(0o755)
  monkeypatch.setattr(run_all, "RESULTS", str(tmp_path))
  run_all.run("peers_torch", run_all.commands("peers_torch", "2", False)[0], 0, str(fake))
  (row,) = [json.loads(line) for line in (tmp_path / "peers_torch.jsonl").read_text().splitlines()]
  assert row["bench"] == "peer" and "peers_torch.py --model bc100" in row["argv"]
  calls = []
  monkeypatch.setattr(run_all, "run", lambda stage, cmd, wait, python: calls.append((stage, python)))
  monkeypatch.setattr(render, "render", lambda results: "")
  run_all.main(["--stages", "train_step,peers_torch", "--torch-python", str(fake),
                "--output", str(tmp_path / "RESULTS.md")])
  assert {python for stage, python in calls if stage == "peers_torch"} == {str(fake)}
  assert {python for stage, python in calls if stage == "train_step"} == {sys.executable}


def test_profile_reads_operand_bytes_from_hlo():
  instrs, comps = profile_step.parse_hlo(
      "%c (a: f32[4,8], b: bf16[2]) -> f32[4,8] {\n"
      "  %a = f32[4,8]{1,0} parameter(0)\n"
      "  ROOT %e = f32[4,8]{1,0} exponential(%a)\n"
      "}\n"
      "ENTRY %main (p: f32[4,8], q: bf16[2]) -> f32[4,8] {\n"
      "  %p = f32[4,8]{1,0} parameter(0)\n"
      "  %q = bf16[2]{0} parameter(1)\n"
      "  ROOT %f = f32[4,8]{1,0} fusion(%p, %q), kind=kLoop, calls=%c\n"
      "}\n")
  assert profile_step.touched_bytes(instrs["f"], instrs) == 4 * 8 * 4 * 2 + 2 * 2
  assert profile_step.classify(instrs["f"], comps) == "elementwise fusion"
  assert profile_step.fused_opcodes(instrs["f"], comps) == {"exponential": 1}


def test_profile_maps_library_calls_with_tuple_results():
  # oneDNN custom calls return (result, scratch); their thunks must not drop out of the profile.
  instrs, comps = profile_step.parse_hlo(
      "ENTRY %main (x: f32[2,8,8,4], w: f32[3,3,4,4]) -> f32[2,8,8,4] {\n"
      "  %x = f32[2,8,8,4]{3,2,1,0} parameter(0)\n"
      "  %w = f32[3,3,4,4]{3,2,1,0} parameter(1)\n"
      "  %custom-call.1.clone = (f32[2,8,8,4]{3,2,1,0}, u8[64]{0}) custom-call(%x, %w), "
      'custom_call_target="__onednn$convolution"\n'
      "}\n")
  cc = instrs["custom-call.1.clone"]
  assert profile_step.classify(cc, comps) == "onednn convolution"
  assert profile_step.thunk_instruction("custom-call.1.clone__onednn$convolution",
                                        instrs) == "custom-call.1.clone"
  assert profile_step.thunk_instruction("ThunkExecutor::Execute", instrs) is None
  image, kernel = 2 * 8 * 8 * 4 * 4, 3 * 3 * 4 * 4 * 4
  assert profile_step.touched_bytes(cc, instrs) == (image + 64) + image + kernel


@pytest.mark.slow
def test_memory_sweep_and_render(tmp_path, capsys):
  rows = memory.main(["--models", "", "--depths", "10,16,22", "--sweep-batch", "1"])
  capsys.readouterr()
  sweep = [r for r in rows if r["bench"] == "memory"]
  assert [r["depth"] for r in sweep] == [10, 16, 22]
  assert all(0 < r["efficient_mib"] <= r["default_mib"] for r in sweep)
  (fit,) = [r for r in rows if r["bench"] == "memory_fit"]
  assert 0 < fit["efficient_mib"]["linear_r2"] <= 1

  step = {"bench": "train_step", "model": "densenet_bc_100", "batch": 64, "dtype": "float32",
          "memory_efficient": False, "img_per_s": 20.0, "load_before": [0.5, 0, 0],
          "load_after": [1.5, 0, 0], "measured": "old"}
  peer = {"bench": "peer", "peer": "torch", "model": "bc100", "batch": 64, "mode": "eager_nchw",
          "img_per_s": 40.0}
  (tmp_path / "train_step.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in (step, dict(step, img_per_s=30.0, measured="new"),
                                             {"bench": "failed", "error": "x"})))
  (tmp_path / "peers_torch.jsonl").write_text(json.dumps(peer) + "\n")
  (tmp_path / "memory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  text = render.render(str(tmp_path))
  assert "| densenet_bc_100 | 64 | float32 | False |" in text
  assert "| 30.0 |" in text and "| new |" in text and "| old |" not in text  # newest row wins
  assert "| 0.50→1.50 |" in text
  assert "| torch | bc100 | 64 | eager_nchw |" in text and "| 0.75 |" in text  # 30 / 40
  assert "| densenet_bc_L22_k12 | 22 |" in text and "straight-line R²" in text


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import torch, torchvision"],
                                   capture_output=True).returncode != 0,
                    reason="torch/torchvision not installed (the peers are optional)")
def test_torch_peer_builds_the_bc100_with_769162_params():
  # a subprocess: torch and tensorflow in one process can crash at import
  code = ("import peers_torch; _, size, classes, params = peers_torch.build('bc100', False); "
          "print(size, classes, params)")
  out = subprocess.run([sys.executable, "-c", code], cwd=BENCH, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["32", "10", "769162"]
