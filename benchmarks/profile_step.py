"""Where the time of one compiled training step goes, by kind of XLA operation.

Traces `--steps` executions of the real train step with `jax.profiler`, reads the XLA:CPU
thunk events from the trace (`jax.profiler.ProfileData`, no TensorBoard needed), maps each
thunk to its HLO instruction in the compiled module and classifies it:

  conv dW (window=image)  weight gradient of a 1x1 conv lowered as a conv whose window is the image
  conv3x3 / conv1x1 / conv other (fwd or bwd = inside transpose(jvp(...)))
  dot (fwd / bwd)         dot_general (e.g. 1x1 convs written as matmuls, the classifier)
  reduce fusion, concat fusion, transpose/copy, elementwise fusion, other

    python benchmarks/profile_step.py --model densenet_bc_100 --batch 64

Prints a JSON line with seconds per category (summed over threads, per step) and the top ops;
--dump-hlo FILE writes the optimised HLO text.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

_COMP_RE = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) ([\w\-]+)\((.*)$")


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
  """(instruction name -> info, computation name -> its instructions) of an HLO module text."""
  instrs: dict[str, dict[str, Any]] = {}
  comps: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  current = None
  for line in text.splitlines():
    m = _COMP_RE.match(line)
    if m and " = " not in line.split("{")[0]:
      current = m.group(1)
      continue
    m = _INSTR_RE.match(line)
    if not m or current is None:
      continue
    name, shape, opcode, rest = m.groups()
    info = {"name": name, "shape": shape, "opcode": opcode, "rest": rest, "comp": current}
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    info["calls"] = calls.group(1) if calls else None
    instrs[name] = info
    comps[current].append(info)
  return instrs, comps


def _conv_kind(info: dict[str, Any]) -> str:
  window = re.search(r"window=\{size=(\d+)x(\d+)", info["rest"])
  direction = "bwd" if "transpose(jvp" in info["rest"] else "fwd"
  if not window:
    return f"conv other {direction}"
  h, w = int(window.group(1)), int(window.group(2))
  out_spatial = re.match(r"\w+\[(\d+),(\d+),(\d+),(\d+)\]", info["shape"])
  if out_spatial and h > 3 and int(out_spatial.group(2)) <= 3:
    return "conv dW (window=image)"
  return f"conv{h}x{w} {direction}"


def classify(name: str, instrs, comps) -> str:
  """The category of the top-level instruction `name`."""
  info = instrs.get(name)
  if info is None:
    return "unmapped"
  ops = [info]
  if info["calls"]:
    ops = comps.get(info["calls"], [])
  opcodes = {o["opcode"] for o in ops}
  for o in ops:
    if o["opcode"] == "convolution":
      return _conv_kind(o)
  if "dot" in opcodes:
    d = next(o for o in ops if o["opcode"] == "dot")
    return "dot " + ("bwd" if "transpose(jvp" in d["rest"] else "fwd")
  if "custom-call" in opcodes:
    return "custom-call"
  if "reduce" in opcodes or "reduce-window" in opcodes:
    return "reduce fusion"
  if "concatenate" in opcodes:
    return "concat fusion"
  if opcodes <= {"transpose", "copy", "parameter", "bitcast", "reshape"}:
    return "transpose/copy"
  if info["opcode"] in ("fusion",):
    return "elementwise fusion"
  return "other: " + info["opcode"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Profiles the compiled train step and prints its time by category as a JSON line."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet_bc_100")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--memory-efficient", action="store_true")
  p.add_argument("--block-config", default=None)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--xla-flags", default=None)
  p.add_argument("--dump-hlo", default=None)
  args = p.parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from train import train  # pylint: disable=g-import-not-at-top

  overrides = {}
  if args.block_config:
    overrides["block_config"] = tuple(int(n) for n in args.block_config.split(","))
  config = train_step.build_config(args.model, args.batch, args.dtype, args.memory_efficient,
                                   overrides)
  from densenet_jax import models  # pylint: disable=g-import-not-at-top
  model = train.create_model(config, models.get_model(config.model).num_classes, 3)
  size = models.native_input_shape(model)[1]
  tx = train.create_optimizer(config, optax.constant_schedule(0.1))
  mesh = train.make_mesh()

  def init(rng):
    v = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=v["params"],
                            batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))

  with jax.threefry_partitionable(False):
    state = jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = jax.device_put(
      {"image": rng.standard_normal((args.batch, size, size, 3), np.float32),
       "label": rng.integers(0, model.num_classes, (args.batch,), np.int32)},
      NamedSharding(mesh, P(train.AXIS)))
  compiled = train.make_train_step(model, tx, config, mesh).lower(state, batch).compile()
  hlo = compiled.as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(hlo)
  instrs, comps = parse_hlo(hlo)
  state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))

  load_before = _common.loadavg()
  with tempfile.TemporaryDirectory() as tmp:
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    jax.profiler.start_trace(tmp)
    for _ in range(args.steps):
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    wall = (time.perf_counter() - wall0) / args.steps
    cpu = (time.process_time() - cpu0) / args.steps
    path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[-1]
    data = jax.profiler.ProfileData.from_file(path)
    per_op: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
      if not plane.name.startswith("/host:CPU"):
        continue
      for line in plane.lines:
        if line.name == "python":
          continue
        for ev in line.events:
          n = ev.name
          if n.startswith("end: ") or "::" in n or n.startswith("$"):
            continue
          if n in instrs:
            per_op[n] += ev.duration_ns / 1e9 / args.steps
  by_cat: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  for n, s in per_op.items():
    c = classify(n, instrs, comps)
    by_cat[c] += s
    counts[c] += 1
  by_prefix: dict[str, float] = collections.defaultdict(float)
  for n, s in per_op.items():
    by_prefix[re.sub(r"\.\d+$", "", n)] += s
  total = sum(by_cat.values())
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]
  row = {
      "bench": "profile",
      "model": args.model, "batch": args.batch, "dtype": args.dtype,
      "memory_efficient": args.memory_efficient, "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "wall_s_per_step": round(wall, 3), "process_cpu_s_per_step": round(cpu, 3),
      "thunk_s_per_step": round(total, 3),
      "categories": {c: {"s": round(s, 4), "frac": round(s / total, 3), "ops": counts[c]}
                     for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])},
      "by_name_prefix": {k: round(v, 4) for k, v in
                         sorted(by_prefix.items(), key=lambda kv: -kv[1])[:args.top]},
      "top_ops": [{"op": n, "kind": classify(n, instrs, comps), "s": round(s, 4)}
                  for n, s in top],
      "load_before": load_before, "load_after": _common.loadavg(),
  }
  _common.emit(row)
  return row


if __name__ == "__main__":
  main()
