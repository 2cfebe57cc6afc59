"""Renders RESULTS.md from benchmarks/results/<stage>.jsonl: each configuration's newest row."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import _common

STAGES = ("train_step", "memory", "input_pipeline", "peers_torch", "peers_keras", "accelerator")
Column = tuple[str, Callable[[dict[str, Any]], Any]]


def load(results: str, stage: str, bench: str, key: Callable[[dict], Any]) -> list[dict]:
  """The newest `bench` row per `key` in a stage's file, in order of first appearance."""
  path = os.path.join(results, f"{stage}.jsonl")
  newest: dict[Any, dict] = {}
  if os.path.exists(path):
    with open(path) as f:
      for row in map(json.loads, filter(str.strip, f)):
        if row.get("bench") == bench:
          newest[key(row)] = row
  return list(newest.values())


def table(columns: list[Column], rows: list[dict]) -> list[str]:
  """A markdown table, one column per (header, cell function)."""
  return (["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)] +
          ["| " + " | ".join(_common.fmt(cell(r)) for _, cell in columns) + " |" for r in rows])


def col(key: str, header: str | None = None) -> Column:
  return header or key, lambda r: r.get(key, "")


def load_col(r: dict) -> str:
  return f"{r['load_before'][0]:.2f}→{r['load_after'][0]:.2f}" if "load_after" in r else ""


def render(results: str) -> str:
  """The text of RESULTS.md."""
  steps = load(results, "train_step", "train_step",
               lambda r: (r["model"], r["batch"], r["dtype"], r["memory_efficient"],
                          r.get("block_buffer", "auto")))
  torch = load(results, "peers_torch", "peer", lambda r: (r["model"], r["mode"]))
  keras = load(results, "peers_keras", "peer", lambda r: r["model"])
  memory = load(results, "memory", "memory", lambda r: (r["set"], r["model"], r["batch"]))
  fits = load(results, "memory", "memory_fit", lambda r: 0)
  pipes = load(results, "input_pipeline", "input_pipeline",
               lambda r: (r["pipeline"], r.get("threads")))
  resumes = load(results, "input_pipeline", "input_pipeline_resume",
                 lambda r: (r["pipeline"], r["examples"], r["rev"], r["skipped_examples"] > 0))
  plans = load(results, "accelerator", "accelerator_plan",
               lambda r: (r["model"], r["topology"], r["variant"], r["memory_efficient"]))
  m = _common.machine()
  out = [
      "# densenet-jax benchmarks", "",
      "Regenerate with `python benchmarks/run_all.py` (`--render-only` rewrites this file from "
      "`benchmarks/results/*.jsonl`). Method, history and rejected ideas: "
      "`docs/performance.md`.", "",
      f"- Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}), "
      f"{m['memory_gib']} GiB; {m['platform']}",
      "- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
      "- `load`: the 1-minute load average before→after a measurement. The machine's 2 cores "
      "are shared: above ~1, other processes took CPU time and the rate is a lower bound.", "",
      "## Train step", "",
      "`train_step.py`: the trainer's `make_train_step` (shard_map over 1 CPU device), SGD "
      "Nesterov 0.9 + weight decay 1e-4, synthetic batch, median of 10 steps after compiling. "
      "GFLOP/s counts 6 × forward MACs per image.", "",
      *table([col("model"), col("batch"), col("dtype"), col("memory_efficient"),
              ("block_buffer", lambda r: r.get("block_buffer", "auto")),
              col("compile_s", "compile s"), col("step_ms", "step ms"), col("img_per_s", "img/s"),
              col("img_per_s_best", "img/s best"), col("gflops", "GFLOP/s"),
              col("temp_mib", "temp MiB"), ("load", load_col), col("measured")], steps), "",
      "## Peers", "",
      "Same batch, float32 and optimiser, train-mode BN, 2 threads. torch: torchvision DenseNet "
      "blocks (BC-100 with densenet_jax's CIFAR stem, 769,162 parameters); Keras 3 "
      "`keras.applications.DenseNet121(weights=None)` on the JAX backend. ours/peer divides "
      "our float32 train-step row above by the peer's; compare their `measured` times.", "",
  ]

  def ours_over(peer: dict, efficient: bool) -> Any:
    name = {"bc100": "densenet_bc_100"}.get(peer["model"], peer["model"])
    ours = [r for r in steps if (r["model"], r["batch"], r["dtype"], r["memory_efficient"]) ==
            (name, peer["batch"], "float32", efficient)]
    return round(ours[0]["img_per_s"] / peer["img_per_s"], 2) if ours else ""

  out += table([col("peer"), col("model"), col("batch"), col("mode"),
                col("first_step_s", "first step s"), col("step_ms", "step ms"),
                col("img_per_s", "img/s"), ("ours/peer", lambda r: ours_over(r, False)),
                ("ours/peer (memory_efficient)", lambda r: ours_over(r, True)),
                ("load", load_col), col("measured")], torch + keras)
  mem_cols = [col("model"), col("depth"), col("k"), col("batch"),
              col("default_mib", "default MiB"), col("efficient_mib", "memory_efficient MiB"),
              col("ratio")]
  out += ["", "## Training-step memory", "",
          "`memory.py`: XLA `memory_analysis()` temp bytes of the compiled forward+backward "
          "step (`densenet_jax.summary.train_step_temp_bytes`), float32. Not affected by load.", "",
          *table(mem_cols, [r for r in memory if r["set"] == "named"]), "",
          "Depth sweep, DenseNet-BC k=12, batch 64:", "",
          *table(mem_cols, [r for r in memory if r["set"] == "sweep"]), ""]
  for f in fits:
    out.append("Fits over the sweep: " + "; ".join(
        f"{mode}: straight-line R² {f[key]['linear_r2']}, L² term "
        f"{f[key]['quadratic_share']:.0%} of the deepest net, {f[key]['mib_per_depth']} MiB per "
        f"unit of depth"
        for mode, key in (("default", "default_mib"), ("memory_efficient", "efficient_mib"))))
    out += ["", "![temp memory vs depth](memory_vs_depth.png)", ""]
  out += ["## Input pipelines", "",
          "`input_pipeline.py`: train/input_pipeline.py on synthetic tfds data.", "",
          *table([col("pipeline"), col("threads"), col("batch"), col("image"),
                  col("first_batch_s", "first batch s"), col("img_per_s", "img/s"),
                  ("load", load_col), col("measured")], pipes), "",
          "Time to the first batch of an iterator started at the epoch's first step and at its "
          "last one (`rev`: the train/input_pipeline.py measured; worktree: uncommitted, as it "
          "was at the time measured):", "",
          *table([col("pipeline"), col("examples"), col("rev"),
                  col("skipped_examples", "skipped examples"),
                  col("first_batch_s", "first batch s"), ("load", load_col), col("measured")],
                 resumes), ""]
  gib = lambda key: lambda r: r[key] / 2**30 if key in r else "does not fit"
  out += ["## Train step on TPU and GPU (compiler estimates)", "",
          "`accelerator_plan.py`: the trainer's train step compiled ahead of time for a TPU slice "
          "or GPU node by `python -m train.plan` (libtpu or JAX's CUDA plugin, no TPU or GPU): "
          "per-chip figures from the TPU compiler's `memory_analysis()` and `cost_analysis()`, "
          "exact for the compiled program and not measurements on hardware; on GPUs (`h100`) "
          "memory from the compiler and flops and bytes counted in the optimised HLO (each "
          "kernel's operands and results; train/plan/cost.py). Roofline: max(flops / bf16 peak, MXU-width flops / bf16 peak (TPUs), bytes / HBM bandwidth) "
          "per step, with the chip figures cited in `train/plan/chips.py`. `shipped`: the model as the "
          "trainer builds it for a TPU (one-buffer dense blocks since 2026-12-07, their layers "
          "run as loop bodies; a looped step's flops and bytes are those of the same step "
          "unrolled, as XLA counts a loop body once; the earlier `shipped` rows, concatenating "
          "blocks, are kept as `concatenating`); `concatenating`: the same with "
          "`block_buffer=False`; `cpu_choices`: the same with the CPU fast path; `textbook`: "
          "tests/reference_densenet.py; `resnet50`: benchmarks/resnet50.py in the same step. "
          "Compile CPU-s are this machine's.", "",
          *table([col("model"), col("topology"), col("variant"), col("dtype"),
                  col("memory_efficient"), col("per_chip_batch", "batch/chip"),
                  ("temp GiB", gib("per_chip_temp_bytes")),
                  ("HBM held GiB", gib("per_chip_peak_bytes")),
                  ("GFLOP/image", lambda r: r.get("flops_per_image", 0) / 1e9),
                  ("MB/image", lambda r: r.get("bytes_accessed_per_image", 0) / 1e6),
                  col("roofline_images_per_s", "roofline img/s/chip"), col("bound"),
                  col("compile_cpu_seconds", "compile CPU-s"), col("measured")], plans), ""]
  return "\n".join(out)
