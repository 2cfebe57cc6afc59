"""What the compiler says about one compiled step: memory, flops, HBM bytes accessed, the
matrix work as the MXU executes it (counted in the optimised HLO), and the roofline bounds."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

from train import errors
from train.plan.chips import Chip, GiB


@dataclasses.dataclass(frozen=True)
class MatmulFlops:
  """The matrix work of an optimised HLO module: as written, and as the MXU executes it."""

  flops: float  # 2 x rows x contraction x output features, summed over convolutions and dots
  mxu_flops: float  # the same with contraction and output features rounded up to the MXU width
  instructions: int


@dataclasses.dataclass(frozen=True)
class _Instruction:
  """One instruction of an HLO module's text."""

  name: str
  shape: str  # its result: an array, or a tuple of them
  opcode: str
  operands: list[str]
  line: str
  in_entry: bool  # in the ENTRY computation: a kernel or library call of its own


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*\w*?)\[([\d,]*)\]")
_BYTES_PER_ELEMENT = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                      "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                      "f64": 8, "c64": 8, "c128": 16}


def _instructions(hlo_text: str) -> list[_Instruction]:
  """Every instruction of `hlo_text` with its operands' names, in order."""
  found, in_entry = [], False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
    elif line.startswith("}"):
      in_entry = False
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    rest, depth, end = m.group(4), 1, 0
    for end, char in enumerate(rest):  # the operand list ends at its closing parenthesis
      depth += (char == "(") - (char == ")")
      if depth == 0:
        break
    found.append(_Instruction(m.group(1), m.group(2), m.group(3),
                              re.findall(r"%([\w.\-]+)", rest[:end]), line, in_entry))
  return found


def _dims(shape: str) -> list[int]:
  """The dimensions of an array shape, or of a tuple's first array (a library call's result)."""
  found = _ARRAY.search(shape)
  return [int(d) for d in found.group(2).split(",") if d] if found else []


def _size(shape: str) -> float:
  """Bytes of every array in `shape` (f8 types: one byte)."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) *
             _BYTES_PER_ELEMENT.get(dtype, 1 if dtype.startswith("f8") else 4)
             for dtype, dims in _ARRAY.findall(shape))


def hlo_bytes_accessed(hlo_text: str) -> float:
  """HBM bytes of an optimised HLO module: each kernel's operands and results, once per kernel.

  The entry computation's instructions are the kernels and library calls (fusions, cuDNN,
  cuBLAS, collectives); each reads its operands from and writes its result to device memory,
  as XLA's own cost analysis counts a fusion. Caches are ignored; bookkeeping instructions
  (parameters, tuples, bitcasts, the second half of an async pair) move nothing.
  """
  sizes: dict[str, float] = {}
  total = 0.0
  for ins in _instructions(hlo_text):
    sizes[ins.name] = _size(ins.shape)
    if ins.in_entry and ins.opcode not in (
        "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
        "partition-id", "replica-id", "after-all", "add-dependency") and not ins.opcode.endswith(
            "-done"):
      total += sizes[ins.name] + sum(sizes.get(o, 0.0) for o in ins.operands)
  return total


# cuDNN's convolutions in XLA:GPU's HLO: their dim_labels describe the forward convolution
# (input, filter -> output); the gradients take or give those three arrays in other places.
_CUDNN = {"__cudnn$convForward": "forward", "__cudnn$convBiasActivationForward": "forward",
          "__cudnn$convBackwardInput": "input", "__cudnn$convBackwardFilter": "filter"}
_CUBLAS = ("__cublas$gemm", "__cublas$lt$matmul")


def matmul_flops(hlo_text: str, mxu_width: int | None = None) -> MatmulFlops:
  """Sums the convolutions and dots of `hlo_text` (optimised HLO), padded to `mxu_width`.

  A convolution `out = conv(lhs, rhs)` with `dim_labels=..._RHS->OUT`: its contraction is the
  rhs input-feature size times the window (every rhs spatial dimension), its output features
  the rhs `o` size (per feature group), its rows every other output element. Dots: contracting
  dims against the rhs's free dims, per batch. XLA:GPU's cuDNN convolutions and cuBLAS gemms
  count as the convolutions and dots they are. Every computation is counted once, a loop body too
  (`plan` reads a step's work from its loop-free form). Without `mxu_width`, `mxu_flops` equals `flops`.
  """
  shapes: dict[str, list[int]] = {}
  flops = mxu = 0.0
  count = 0

  def up(n: int) -> int:
    return -(-n // mxu_width) * mxu_width if mxu_width else n

  def dims(key: str, line: str) -> list[int]:  # `key={0,1}` (HLO) or `"key":["0","1"]` (JSON)
    found = re.search(rf'{key}(?:=\{{|":\[)([\d,"\s]*)', line)
    return [int(d) for d in re.findall(r"\d+", found.group(1))] if found else []

  for ins in _instructions(hlo_text):
    out = shapes[ins.name] = _dims(ins.shape)
    target = re.search(r'custom_call_target="([^"]+)"', ins.line)
    target = target.group(1) if target and ins.opcode == "custom-call" else None
    if ins.opcode == "convolution" or target in _CUDNN:
      lhs, rhs = (shapes[o] for o in ins.operands[:2])
      role = _CUDNN.get(target, "forward")
      if role == "input":
        out, rhs = lhs, rhs  # (output gradient, filter) -> input gradient
      elif role == "filter":
        out, rhs = rhs, out  # (input, output gradient) -> filter gradient
      labels = re.search(r"dim_labels=\w+_(\w+)->(\w+)", ins.line)
      rhs_labels, out_labels = labels.group(1), labels.group(2)
      groups = math.prod(int(g) for g in re.findall(r"(?:feature|batch)_group_count=(\d+)",
                                                    ins.line)) or 1
      contraction = rhs[rhs_labels.index("i")] * math.prod(
          size for size, label in zip(rhs, rhs_labels) if label.isdigit())
      features = out[out_labels.index("f")]
      rows = math.prod(out) // features
      padded_features = groups * up(features // groups)
    elif ins.opcode == "dot" or target in _CUBLAS:
      lhs, rhs = (shapes[o] for o in ins.operands[:2])
      batch = math.prod(rhs[d] for d in dims("rhs_batch_dim\\w*", ins.line))
      contraction = math.prod(rhs[d] for d in dims("rhs_contracting_dim\\w*", ins.line))
      features = math.prod(rhs) // (batch * contraction)
      rows = math.prod(lhs) // contraction  # every lhs row, batch included
      padded_features = up(features)
    else:
      continue
    flops += 2.0 * rows * contraction * features
    mxu += 2.0 * rows * up(contraction) * padded_features
    count += 1
  return MatmulFlops(flops=flops, mxu_flops=mxu, instructions=count)


@dataclasses.dataclass(frozen=True)
class StepCost:
  """What the compiler says about one compiled step, per chip."""

  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  peak_bytes: int
  flops: float
  bytes_accessed: float
  matmul: MatmulFlops
  compile_seconds: float
  compile_cpu_seconds: float
  from_hlo: bool = False  # flops and bytes counted in the HLO (no compiler cost analysis)
  loops: int = 0  # while loops in the optimised HLO: their bodies' work is counted once

  def times(self, n: int) -> StepCost:
    """The figures of `n` devices running this step side by side (one chip of n devices)."""
    if n == 1:
      return self
    return dataclasses.replace(
        self, **{f: getattr(self, f) * n for f in (
            "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
            "generated_code_bytes", "peak_bytes", "flops", "bytes_accessed")},
        matmul=MatmulFlops(self.matmul.flops * n, self.matmul.mxu_flops * n,
                           self.matmul.instructions))


class OutOfMemory(Exception):
  """The step does not fit in HBM: the TPU compiler found no schedule, or it needs more."""

  def __init__(self, message: str, required_bytes: float | None = None):
    super().__init__(message)
    found = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
    self.required_bytes = (required_bytes if required_bytes is not None else
                           float(found.group(1)) * GiB if found else None)


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (XLA:GPU runs ptxas once per kernel)."""
  used = os.times()
  return used.user + used.system + used.children_user + used.children_system


def compile_cost(lowerable: Any, *args: Any, mxu_width: int | None = 128,
                 hlo_path: str | None = None) -> StepCost:
  """Lowers and compiles `lowerable(*args)` (a jitted function) and reads its analyses.

  `hlo_path` receives the optimised HLO (the fusions, shapes and TPU layouts behind the bytes).
  Raises OutOfMemory when the compiler reports that the step cannot fit in the chip's HBM
  (it rematerialises on its own before it gives up, so this is its verdict, not ours).
  Without a cost analysis (XLA:GPU has none without a GPU), flops are the convolutions' and
  dots' (matmul_flops) and bytes each kernel's operands and results (hlo_bytes_accessed).
  """
  wall, cpu = time.perf_counter(), _cpu_seconds()
  try:
    compiled = lowerable.lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e) or "HbmOom" in str(e):
      raise OutOfMemory(str(e)) from None
    if "suitable version of ptxas" in str(e):
      raise errors.ConfigError(
          "Compiling for a GPU needs CUDA's ptxas (no GPU or driver): pip install "
          "nvidia-cuda-nvcc-cu12.") from None
    raise
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
  text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  memory = compiled.memory_analysis()
  try:
    cost = compiled.cost_analysis() or {}
  except Exception:  # pylint: disable=broad-except
    cost = {}  # XLA:GPU without a GPU: UNIMPLEMENTED
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  matmul = matmul_flops(text, mxu_width)
  components = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                + memory.generated_code_size_in_bytes)
  return StepCost(
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      generated_code_bytes=memory.generated_code_size_in_bytes,
      # What the step holds in HBM: the compiler's `peak_memory_in_bytes` is a heap
      # simulation that can come out below the temporaries alone, so it is not used.
      peak_bytes=components,
      flops=float(cost["flops"]) if cost else matmul.flops,
      bytes_accessed=float(cost["bytes accessed"]) if cost else hlo_bytes_accessed(text),
      matmul=matmul, compile_seconds=wall, compile_cpu_seconds=cpu, from_hlo=not cost,
      loops=sum(ins.opcode == "while" for ins in _instructions(text)))


BOUNDS = ("compute", "MXU-width compute", "HBM bandwidth")


def bound_seconds(cost: StepCost, chip: Chip) -> dict[str, float]:
  """The step's lower bounds on `chip`, by name (BOUNDS; the MXU's on TPUs only)."""
  bounds = dict(zip(BOUNDS, (cost.flops / chip.bf16_flops_per_s,
                             cost.matmul.mxu_flops / chip.bf16_flops_per_s,
                             cost.bytes_accessed / chip.hbm_bytes_per_s)))
  if not chip.mxu_width:
    del bounds["MXU-width compute"]
  return bounds


def roofline_seconds(cost: StepCost, chip: Chip) -> tuple[float, str]:
  """The step's lower bound on `chip` (the largest of its three) and the name of that bound."""
  bounds = bound_seconds(cost, chip)
  binding = max(bounds, key=bounds.__getitem__)
  return bounds[binding], binding
