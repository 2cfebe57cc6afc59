"""Renders benchmarks/RESULTS.md from the JSON rows in benchmarks/results/*.jsonl."""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

BC100_GFLOP_PER_IMG = 1.728
# densenet_jax.models integrated the dot1x1 + sharedstats + ctchain prototypes at this time:
# XLA-flag rows measured before it (or with a prototype "variant") are of the older model.
SHIPPED_SINCE = "2026-11-22T19:20"
PROTOTYPES_COMMIT = "3df1acb"


def _read(results_dir: str) -> dict[str, list[dict[str, Any]]]:
  out = {}
  for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
    stage = os.path.basename(path)[:-len(".jsonl")]
    rows = []
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line.startswith("{"):
          rows.append(json.loads(line))
    out[stage] = rows
  return out


def _latest(rows: list[dict[str, Any]], key) -> list[dict[str, Any]]:
  """The newest row of every key (file order), in order of first appearance."""
  seen: dict[Any, dict[str, Any]] = {}
  for r in rows:
    seen[key(r)] = r
  return list(seen.values())


def _load(r: dict[str, Any]) -> str:
  b, a = r.get("load_before"), r.get("load_after")
  if b is None:
    return ""
  return f"{b[0]:.2f}→{a[0]:.2f}" if a else f"{b[0]:.2f}"


def _table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
  lines = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
  for r in rows:
    cells = []
    for _, k in columns:
      v = k(r) if callable(k) else r.get(k, "")
      cells.append(_common._fmt(v))  # pylint: disable=protected-access
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _step_key(r: dict[str, Any]) -> tuple:
  return (r.get("variant", "baseline"), r.get("model"), r.get("batch"), r.get("dtype"),
          r.get("memory_efficient"), r.get("xla_flags", ""))


def _find(rows: list[dict[str, Any]], **want) -> dict[str, Any] | None:
  """The last row with these field values (a missing xla_flags counts as none)."""
  for r in reversed(rows):
    if all(r.get(k, "" if k == "xla_flags" else None) == v for k, v in want.items()):
      return r
  return None


def _shipped(r: dict[str, Any]) -> bool:
  """Whether a train-step row measured the model as integrated (not a prototype, not older)."""
  return r.get("variant", "baseline") == "baseline" and r.get("measured", "") >= SHIPPED_SINCE


def render(results_dir: str) -> str:
  """RESULTS.md's text from the rows in `results_dir`."""
  data = _read(results_dir)
  m = _common.machine()
  v = _common.versions()
  out = ["# densenet-jax benchmarks", ""]
  out.append("Regenerate with `python benchmarks/run_all.py` (`--full` adds torch.compile and "
             "XLA flags; `--render-only` rewrites this file from `benchmarks/results/*.jsonl`). "
             "How the numbers were taken and what they mean: `benchmarks/NOTES.md`.")
  out.append("")
  out.append(f"- Machine: {m['cpu']}, {m['cores']} cores, ISA {', '.join(m['isa'])}, "
             f"{m['memory_gib']} GiB; {m['platform']}")
  out.append(f"- Rendered {m['date']} at commit {_common.git_commit() or '?'}; each row "
             f"carries the time it was measured.")
  out.append("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
  out.append("- `load` = 1-minute load average before→after the measurement. This machine "
             "has 2 cores shared with other users: a load above ~1 means the measurement "
             "lost CPU time to other processes and the rate is a lower bound.")
  out.append("- Training FLOPs = 6 × forward MACs per image (forward 2×MAC, backward ≈ 2× "
             "forward); BC-100: 1.728 GFLOP/image, DenseNet-121: 17.0 GFLOP/image.")
  out.append("")

  steps = _latest(data.get("train_step", []), _step_key)
  flag_rows = [r for r in data.get("xla_flags", []) if r.get("bench") == "train_step"]
  flags = _latest([r for r in flag_rows if _shipped(r)], _step_key)
  prototypes = _latest([r for r in data.get("variants", []) + flag_rows if not _shipped(r)],
                       _step_key)
  checks = [r for r in data.get("variant_checks", []) if "variant" in r]
  peers = _latest(data.get("peers_torch", []) + data.get("torch_compile", []) +
                  data.get("peers_keras", []),
                  lambda r: (r.get("peer"), r.get("model"), r.get("batch"), r.get("mode"),
                             r.get("memory_efficient")))
  steps = [r for r in steps if r.get("bench") == "train_step"]
  prototypes = [r for r in prototypes if r.get("bench") == "train_step"]
  peers = [r for r in peers if r.get("bench") == "peer"]
  memory = data.get("memory", [])
  pairs = [r for r in memory if r.get("bench") == "memory_pair"]
  fits = next((r for r in memory if r.get("bench") == "memory_fit"), None)
  pipes = _latest([r for r in data.get("input_pipeline", []) if r.get("bench") ==
                   "input_pipeline"], lambda r: r["pipeline"])
  roof = _latest([r for r in data.get("roof", []) if r.get("bench") == "roof"],
                 lambda r: (r["lib"], r["dtype"]))

  # ------------------------------------------------------------------ targets
  out += ["## Targets", ""]
  trows = []

  def candidates(model: str, batch: int) -> tuple[tuple[str, dict[str, Any] | None], ...]:
    return (
        ("as shipped", _find(steps, model=model, batch=batch, dtype="float32",
                             memory_efficient=False)),
        ("as shipped, memory_efficient=True", _find(steps, model=model, batch=batch,
                                                    dtype="float32", memory_efficient=True)),
    )

  torch_bc = [r for r in peers if r["peer"] == "torch" and r["model"] == "bc100" and
              r["batch"] == 64 and r["mode"].startswith("eager") and
              not r.get("memory_efficient")]
  best_torch = max(torch_bc, key=lambda r: r["img_per_s"]) if torch_bc else None
  for label, ours in candidates("densenet_bc_100", 64):
    if ours and best_torch:
      ratio = ours["img_per_s"] / best_torch["img_per_s"]
      trows.append({"target": f"BC-100 b64 f32 train step ≥ 1.5× torch eager (best of "
                              f"NCHW/channels_last) — {label}",
                    "measured": f"{ours['img_per_s']:.1f} vs {best_torch['img_per_s']:.1f} "
                                f"img/s ({best_torch['mode']})",
                    "ratio": f"{ratio:.2f}×", "met": "yes" if ratio >= 1.5 else "NO",
                    "load": f"{_load(ours)} / {_load(best_torch)}"})
  keras = next((r for r in peers if r["peer"] == "keras" and r["model"] == "densenet121"),
               None)
  for label, ours in candidates("densenet121", 8):
    if ours and keras:
      ratio = ours["img_per_s"] / keras["img_per_s"]
      trows.append({"target": f"DenseNet-121 b8 f32 train step ≥ 1.2× Keras 3 on JAX — {label}",
                    "measured": f"{ours['img_per_s']:.2f} vs {keras['img_per_s']:.2f} img/s",
                    "ratio": f"{ratio:.2f}×", "met": "yes" if ratio >= 1.2 else "NO",
                    "load": f"{_load(ours)} / {_load(keras)}"})
  for label, ours in candidates("densenet_bc_100", 64):
    if ours:
      frac = ours["img_per_s"] * BC100_GFLOP_PER_IMG / 190.0
      trows.append({"target": f"fraction of the ~190 GFLOP/s roof (~110 img/s BC-100) — {label}",
                    "measured": f"{ours['img_per_s'] * BC100_GFLOP_PER_IMG:.1f} GFLOP/s",
                    "ratio": f"{frac:.1%}", "met": "(report)", "load": _load(ours)})
  bc_pair = next((p for p in pairs if p["model"] == "densenet_bc_100" and p["batch"] == 64
                  and "ratio" in p), None)
  if bc_pair:
    trows.append({"target": "memory_efficient temp ≤ 0.5× default, BC-100 b64",
                  "measured": f"{bc_pair['efficient_mib']:.0f} vs {bc_pair['default_mib']:.0f} MiB",
                  "ratio": f"{bc_pair['ratio']:.2f}×",
                  "met": "yes" if bc_pair["ratio"] <= 0.5 else "NO", "load": "n/a"})
  e, d = (fits or {}).get("efficient_mib"), (fits or {}).get("default_mib")
  if e:
    versus = (f" (default: R² {d['linear_r2']:.4f}, L² term "
              f"{d['quadratic_share_at_max_depth']:.0%})" if d else "")
    trows.append({"target": "memory_efficient grows ~linearly with depth (BC k=12, b64)",
                  "measured": f"linear fit R² {e['linear_r2']:.4f}, L² term "
                              f"{e['quadratic_share_at_max_depth']:.0%} of the deepest" + versus,
                  "ratio": f"×{e['ratio_deepest_to_shallowest']:.1f} memory for "
                           f"×{e['depth_ratio']:.1f} depth" +
                           (f" (default ×{d['ratio_deepest_to_shallowest']:.1f})" if d else ""),
                  "met": "yes" if e["quadratic_share_at_max_depth"] < 0.15 else "NO",
                  "load": "n/a"})
  out.append(_table([("target", "target"), ("measured", "measured"), ("ours/peer", "ratio"),
                     ("met", "met"), ("load ours / peer", "load")], trows) if trows else
             "_no rows yet_")
  out.append("")

  # ------------------------------------------------------------------ roof
  if roof:
    out += ["## Machine roof (large GEMM)", ""]
    out.append(_table([("library", "lib"), ("dtype", "dtype"), ("n", "n"),
                       ("GFLOP/s", "gflops"), ("load", lambda r: r["load"][0])], roof))
    out.append("")

  # ------------------------------------------------------------------ train step
  step_cols = [("model", "model"), ("batch", "batch"), ("dtype", "dtype"),
               ("memory_efficient", "memory_efficient"), ("lower s", "lower_s"),
               ("compile s", "compile_s"), ("step ms (median)", "step_ms"),
               ("img/s", "img_per_s"), ("img/s best", "img_per_s_best"),
               ("GFLOP/s", "gflops"), ("roof frac", "roof_frac"),
               ("temp MiB", "temp_mib"), ("load", _load), ("measured", "measured")]
  if steps:
    out += ["## Train step (the project's `make_train_step`, shard_map over 1 CPU device)", ""]
    out.append(f"Median of {steps[0].get('steps', '?')} steps after compiling; SGD Nesterov "
               "0.9, weight decay 1e-4; synthetic batch.")
    out.append("")
    out.append(_table(step_cols, steps))
    out.append("")
  if flags:
    out += ["## XLA flags (the shipped model)", ""]
    out.append("`train_step.py --xla-flags=…`; \"× no flag\" divides by the train-step row of "
               "the same model, batch, dtype and memory_efficient without flags, when that row "
               f"was also measured on the shipped model (since {SHIPPED_SINCE}).")
    out.append("")

    def no_flag(r: dict[str, Any]) -> dict[str, Any] | None:
      base = _find(steps, model=r["model"], batch=r["batch"], dtype=r["dtype"],
                   memory_efficient=r["memory_efficient"], xla_flags="")
      return base if base and _shipped(base) else None

    cols = [("flag", "xla_flags")] + step_cols[:4] + [
        ("compile s", "compile_s"), ("step ms", "step_ms"), ("img/s", "img_per_s"),
        ("× no flag", lambda r: round(r["img_per_s"] / no_flag(r)["img_per_s"], 2)
         if no_flag(r) else ""),
        ("temp MiB", "temp_mib"), ("load", _load), ("measured", "measured")]
    out.append(_table(cols, flags))
    out.append("")

  # ------------------------------------------------------------------ peers
  if peers:
    out += ["## Peers", ""]
    out.append("Same batch, float32, SGD Nesterov 0.9 + weight decay 1e-4, train-mode BN, "
               "2 threads. torch: torchvision DenseNet blocks (BC-100 with the CIFAR stem, "
               "769,162 parameters); Keras 3 `keras.applications.DenseNet121(weights=None)` "
               "on the JAX backend.")
    out.append("")

    def ours_over_peer(r: dict[str, Any], efficient: bool) -> float | str:
      model = "densenet_bc_100" if r["model"] == "bc100" else r["model"]
      ours = _find(steps, model=model, batch=r["batch"], dtype="float32",
                   memory_efficient=efficient)
      return round(ours["img_per_s"] / r["img_per_s"], 2) if ours else ""

    cols = [("peer", "peer"), ("model", "model"), ("batch", "batch"), ("mode", "mode"),
            ("compile/first step s", lambda r: r.get("compile_s") or r.get("first_step_s")),
            ("step ms", "step_ms"), ("img/s", "img_per_s"),
            ("ours/peer (as shipped)", lambda r: ours_over_peer(r, False)),
            ("ours/peer (as shipped, memory_efficient)", lambda r: ours_over_peer(r, True)),
            ("load", _load), ("measured", "measured")]
    out.append(_table(cols, peers))
    out.append("")

  # ------------------------------------------------------------------ memory
  if pairs:
    out += ["## Training-step memory (XLA `memory_analysis()` temp bytes)", ""]
    out.append("`densenet_jax.summary.train_step_temp_bytes`: compiled forward+backward, "
               "float32, no data. Not affected by load.")
    out.append("")
    cols = [("model", "model"), ("depth", "depth"), ("k", "k"), ("batch", "batch"),
            ("default MiB", "default_mib"), ("memory_efficient MiB", "efficient_mib"),
            ("ratio", "ratio"), ("compile s (both)", "compile_s")]
    out.append(_table(cols, [p for p in pairs if p.get("set") == "named"]))
    out.append("")
    sweep = sorted((p for p in pairs if p.get("set") == "sweep"), key=lambda p: p["depth"])
    if sweep:
      out.append("Depth sweep, DenseNet-BC k=12, batch 64 (`memory_vs_depth.png`):")
      out.append("")
      out.append(_table(cols, sweep))
      out.append("")
      if fits:
        out.append("Fits over the sweep: " + "; ".join(
            f"{k.replace('_mib', '')}: linear R² {f['linear_r2']}, L² term "
            f"{f['quadratic_share_at_max_depth']:.0%} of the deepest net, "
            f"{f['mib_per_depth_linear']} MiB per unit of depth"
            for k, f in fits.items() if isinstance(f, dict)))
        out.append("")
      out.append("![temp memory vs depth](memory_vs_depth.png)")
      out.append("")

  # ------------------------------------------------------------------ input pipeline
  if pipes:
    out += ["## Input pipelines (train/input_pipeline.py, synthetic tfds data)", ""]

    def train_rate(r):
      want = ("densenet_bc_100", 64) if r["pipeline"] == "cifar" else ("densenet121", 8)
      s = _find(steps, model=want[0], batch=want[1], dtype="float32", memory_efficient=False)
      return s["img_per_s"] if s else None

    cols = [("pipeline", "pipeline"), ("batch", "batch"), ("image", "image"),
            ("examples", "examples"), ("first batch s", "first_batch_s"),
            ("img/s (median)", "img_per_s"), ("img/s (mean)", "img_per_s_mean"),
            ("train step img/s", lambda r: train_rate(r) or ""),
            ("pipeline / step", lambda r: round(r["img_per_s"] / train_rate(r))
             if train_rate(r) else ""),
            ("load", _load), ("measured", "measured")]
    out.append(_table(cols, pipes))
    out.append("")
    out.append("The pipeline alone uses up to its private 2-thread pool; while training, "
               "`cpu_budget=1` keeps it to about one core. The train-step rate is the "
               "float32 default step of the matching model (CIFAR: BC-100 b64; ImageNet: "
               "DenseNet-121 b8).")
    out.append("")

  # ------------------------------------------------------------------ history
  if prototypes or checks:
    out += [(f"## Prototypes measured before integration (benchmarks/variants.py at commit "
             f"{PROTOTYPES_COMMIT}; the shipped model now includes dot1x1 + sharedstats + "
             "ctchain)"), ""]
    out.append("Historical numbers, kept as recorded: each prototype was patched into the "
               "model of that time, which the shipped model has since replaced, so they are "
               "not comparable with the tables above. `variants.py` and its description of "
               f"each prototype are in git history (`git show {PROTOTYPES_COMMIT}:"
               "benchmarks/variants.py`).")
    out.append("")
  if prototypes:
    cols = [("variant", lambda r: "none (the model of that time)"
             if r.get("variant", "baseline") == "baseline" else r["variant"])]
    if any(r.get("xla_flags") for r in prototypes):
      cols.append(("xla_flags", "xla_flags"))
    cols += step_cols[:4] + [("img/s", "img_per_s"), ("temp MiB", "temp_mib"), ("load", _load),
                             ("measured", "measured")]
    out.append(_table(cols, prototypes))
    out.append("")
  if checks:
    out.append("Equivalence checks (`variants.check`: a BC-16 k=12 net, batch 8, random weights "
               "and data; each prototype against the model of that time):")
    out.append("")
    out.append(_table([("variant", "variant"), ("memory_efficient", "memory_efficient"),
                       ("loss abs err", "loss_abs_err"),
                       ("grad max rel err", "grad_max_rel_err"),
                       ("batch_stats max rel err", "batch_stats_max_rel_err")], checks))
    out.append("")

  last_per_cmd = _latest([r for rows in data.values() for r in rows],
                         lambda r: (r.get("stage"), r.get("cmd"), r.get("bench") == "failed"
                                    or r.get("bench")))
  # runs of the removed prototype stage (every command with --variant) are never retried
  failures = [r for r in last_per_cmd if r.get("bench") == "failed" and
              "--variant " not in r.get("cmd", "") and not any(
                  o.get("cmd") == r.get("cmd") and o.get("bench") != "failed" and
                  o.get("measured", "") > r.get("measured", "") for o in last_per_cmd)]
  if failures:
    out += ["## Failed or skipped runs", ""]
    out.append(_table([("stage", "stage"), ("command", "cmd"), ("error", "error"),
                       ("measured", "measured")], failures))
    out.append("")
  return "\n".join(out)


if __name__ == "__main__":
  print(render(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")))
