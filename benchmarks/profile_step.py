"""Where the time of one compiled training step goes: by kind of XLA op, and the top ops' GB/s.

Builds the step `train_step.py` times, traces --steps executions with `jax.profiler`, reads
the XLA:CPU thunk events (`jax.profiler.ProfileData`, no TensorBoard needed), maps each to
its instruction in the compiled HLO and classifies it (conv / dot / reduce / concat /
transpose-copy / elementwise fusion). For the top ops it reports the bytes the op's operands
and result occupy and the effective GB/s (an upper bound of what it touches: a fusion that
reads a slice of an operand is charged the whole operand), plus which opcodes it fuses.

    python benchmarks/profile_step.py --model densenet_bc_100 --batch 64 --memory-efficient

Prints one JSON line; --dump-hlo FILE writes the optimised HLO text to read the fusions in.
Thunk seconds are summed over XLA's threads, so they exceed the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

_COMP_RE = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
# A result shape is one array or a tuple, e.g. a oneDNN custom call's (result, scratch).
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+?) ([\w\-]+)\((.*)$")
_ARRAY_RE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|s64|f64)\[([\d,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1,
          "s64": 8, "f64": 8}


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
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    info = {"name": name, "shape": shape, "opcode": opcode, "rest": rest, "comp": current,
            "calls": calls.group(1) if calls else None}
    instrs[name] = info
    comps[current].append(info)
  return instrs, comps


def _nbytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY_RE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES[dtype]
  return total


def touched_bytes(info: dict[str, Any], instrs: dict[str, dict[str, Any]]) -> int:
  """Bytes of the op's result plus those of its operands (looked up by name)."""
  operands = re.findall(r"%([\w.\-]+)", info["rest"].split("), ")[0])
  return _nbytes(info["shape"]) + sum(_nbytes(instrs[o]["shape"]) for o in operands
                                      if o in instrs)


def classify(info: dict[str, Any] | None, comps) -> str:
  """The category of a top-level instruction."""
  if info is None:
    return "unmapped"
  target = re.search(r'custom_call_target="([^"]+)"', info["rest"])
  if info["opcode"] == "custom-call" and target:
    kind = target.group(1).lstrip("_").replace("$", " ")  # e.g. "onednn convolution"
    # A library convolution is named by its filter's window, as native ones are ("conv3x3").
    window = re.search(r'"filter":\{[^}]*"shape":\["(\d+)","(\d+)"', info["rest"])
    if kind.endswith(" convolution") and window:
      return f"{kind.removesuffix('convolution')}conv{window.group(1)}x{window.group(2)}"
    return kind
  ops = comps.get(info["calls"], []) if info["calls"] else [info]
  opcodes = {o["opcode"] for o in ops}
  for o in ops:
    if o["opcode"] == "convolution":
      window = re.search(r"window=\{size=(\d+)x(\d+)", o["rest"])
      return f"conv{window.group(1)}x{window.group(2)}" if window else "conv"
  if "dot" in opcodes:
    return "dot"
  if "reduce" in opcodes or "reduce-window" in opcodes:
    return "reduce fusion"
  if "concatenate" in opcodes:
    return "concat fusion"
  if opcodes <= {"transpose", "copy", "parameter", "bitcast", "reshape"}:
    return "transpose/copy"
  if info["opcode"] == "fusion":
    return "elementwise fusion"
  return "other: " + info["opcode"]


def thunk_instruction(event: str, instrs: dict[str, dict[str, Any]]) -> str | None:
  """The instruction a trace event ran, or None; library thunks append `__<target>`."""
  if event in instrs:
    return event
  name = event.split("__", 1)[0]  # e.g. "custom-call.1.clone__onednn$convolution"
  return name if name in instrs and instrs[name]["opcode"] == "custom-call" else None


def fused_opcodes(info: dict[str, Any], comps) -> dict[str, int]:
  """How many of each opcode a fusion holds (parameters and bitcasts left out)."""
  ops = comps.get(info["calls"], []) if info["calls"] else [info]
  counts = collections.Counter(o["opcode"] for o in ops
                               if o["opcode"] not in ("parameter", "bitcast"))
  return dict(counts.most_common())


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Profiles the compiled train step and prints its time by category as a JSON line."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet_bc_100")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--memory-efficient", action="store_true")
  p.add_argument("--block-config", default=None, help="e.g. 1,1,1 (tiny smoke-test nets)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--dump-hlo", default=None)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top

  overrides = {}
  if args.block_config:
    overrides["block_config"] = tuple(int(n) for n in args.block_config.split(","))
  b = train_step.build(args.model, args.batch, args.dtype, args.memory_efficient, **overrides)
  compiled = b.step.lower(b.state, b.data).compile()
  hlo = compiled.as_text()
  if args.dump_hlo:
    with open(args.dump_hlo, "w") as f:
      f.write(hlo)
  instrs, comps = parse_hlo(hlo)
  state = b.state
  state, _ = jax.block_until_ready(compiled(state, b.data))
  load_before = _common.loadavg()
  per_op: dict[str, float] = collections.defaultdict(float)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(args.steps):
      state, _ = jax.block_until_ready(compiled(state, b.data))
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[-1]
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/host:CPU"):
        continue
      for line in plane.lines:
        for ev in line.events:
          name = thunk_instruction(ev.name, instrs)
          if name:
            per_op[name] += ev.duration_ns / 1e9 / args.steps
  by_cat: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0, 0])
  for name, s in per_op.items():
    cat = by_cat[classify(instrs[name], comps)]
    cat[0] += s
    cat[1] += 1
    cat[2] += touched_bytes(instrs[name], instrs)
  total = sum(c[0] for c in by_cat.values())
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:args.top]
  row = {
      "bench": "profile", "model": args.model, "batch": args.batch, "dtype": args.dtype,
      "memory_efficient": args.memory_efficient, "thunk_s_per_step": round(total, 3),
      "categories": {
          c: {"s": round(s, 4), "frac": round(s / total, 3), "ops": n,
              "gb_per_s": round(nbytes / s / 1e9, 2)}
          for c, (s, n, nbytes) in sorted(by_cat.items(), key=lambda kv: -kv[1][0])},
      "top_ops": [{"op": n, "kind": classify(instrs[n], comps), "ms": round(s * 1e3, 2),
                   "mb": round(touched_bytes(instrs[n], instrs) / 1e6, 1),
                   "gb_per_s": round(touched_bytes(instrs[n], instrs) / s / 1e9, 2),
                   "shape": instrs[n]["shape"], "fuses": fused_opcodes(instrs[n], comps)}
                  for n, s in top],
      "load_before": load_before, "load_after": _common.loadavg(),
  }
  _common.emit(row)
  return row


if __name__ == "__main__":
  main()
