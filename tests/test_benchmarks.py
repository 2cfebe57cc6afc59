"""Smoke test: the benchmark scripts run on tiny models and print valid JSON (< 60 s)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _import(name):
  sys.path.insert(0, BENCH)
  try:
    return __import__(name)
  finally:
    sys.path.remove(BENCH)


def _run(script, argv, capsys):
  """Runs a benchmark's main(argv) in-process; returns the JSON lines it printed."""
  capsys.readouterr()
  _import(script).main(argv)
  out = capsys.readouterr().out
  rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
  assert rows, out
  return rows


def test_train_step_and_memory_scripts_print_json(tmp_path, capsys):
  table = tmp_path / "steps.md"
  (row,) = _run("train_step", ["--block-config", "1,1,1", "--batch", "4", "--steps", "2",
                               "--warmup", "0", "--markdown", str(table)], capsys)
  assert row["bench"] == "train_step" and row["model"] == "densenet_bc_100"
  assert row["img_per_s"] > 0 and row["compile_s"] > 0 and len(row["load_before"]) == 3
  assert row["temp_mib"] > 0 and row["loss"] == row["loss"]  # finite, not NaN
  assert table.read_text().count("\n") == 3  # header, rule, one row

  rows = _run("memory", ["--set", "sweep", "--depths", "10,16,22", "--sweep-batch", "1",
                         "--cache", ""], capsys)
  pairs = [r for r in rows if r["bench"] == "memory_pair"]
  assert [p["depth"] for p in pairs] == [10, 16, 22]
  assert all(0 < p["efficient_mib"] <= p["default_mib"] for p in pairs)
  assert any(r["bench"] == "memory_fit" for r in rows)

  # RESULTS.md renders from rows like these
  render = _import("render")
  (tmp_path / "results").mkdir()
  with open(tmp_path / "results" / "train_step.jsonl", "w") as f:
    f.write(json.dumps(dict(row, batch=64, stage="train_step", measured="now")) + "\n")
  with open(tmp_path / "results" / "memory.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  text = render.render(str(tmp_path / "results"))
  assert "## Train step" in text and "Depth sweep" in text and "## Targets" in text


def test_render_separates_shipped_xla_flag_rows_from_prototypes(tmp_path):
  render = _import("render")
  step = {"bench": "train_step", "model": "densenet_bc_100", "batch": 64, "dtype": "float32",
          "memory_efficient": True, "xla_flags": "", "img_per_s": 20.0,
          "measured": "2026-11-22T20:00:00+00:00"}
  flag = "--xla_cpu_use_onednn=true"
  rows = {
      "train_step": [step],
      "xla_flags": [dict(step, variant="dot1x1", xla_flags=flag, img_per_s=11.0,
                         measured="2026-11-22T19:00:00+00:00"),
                    dict(step, xla_flags=flag, img_per_s=25.0)],
      "variants": [dict(step, variant="dot1x1", img_per_s=17.0,
                        measured="2026-11-22T18:30:00+00:00")],
      "memory": [],  # a memory run in progress has truncated its file
  }
  for stage, stage_rows in rows.items():
    (tmp_path / f"{stage}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stage_rows))
  text = render.render(str(tmp_path))
  current, history = text.split("## Prototypes measured before integration")
  flags_table = current.split("## XLA flags")[1]
  assert f"| {flag} |" in flags_table and "| 1.25 |" in flags_table  # 25 / 20 img/s
  assert "| 11.0 |" not in current and "| 11.0 |" in history and "| 17.0 |" in history
  assert "Training-step memory" not in text


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
