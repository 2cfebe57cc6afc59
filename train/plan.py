"""Plans a run on TPUs or GPUs that are not here: does it fit, how fast, how long to compile.

    python -m train.plan --config configs/imagenet_densenet121.py --topology v5e:16x16
    python -m train.plan --config configs/cifar_bc.py --topology v6e:2x2 --json
    python -m train.plan --config configs/cifar_bc.py --topology h100:8

Compiles, ahead of time on this machine's CPU, exactly the train and eval steps `train.main`
would run on that topology (same model, optimizer, dtype, sharding, donation and batch per
chip; `--config.FIELD=VALUE` overrides work as in train.main) and reports, per chip, what the
compiler says: memory (arguments, temporaries, peak against the chip's HBM), flops and HBM
bytes accessed per step, and from those a roofline step time against the chip's published peak.
Every figure is a compiler estimate, not a measurement on hardware. No data and no workdir:
dataset sizes come from a table of the shipped datasets. TPUs need libtpu
(`pip install -e '.[tpu]'`); NVIDIA GPUs (H100, H200, A100) need JAX's CUDA plugin and CUDA's
ptxas, nothing that needs a GPU or a driver (`pip install 'jax-cuda12-plugin==JAX_VERSION'
nvidia-cuda-nvcc-cu12`, about 240 MB). Without a GPU, XLA:GPU has no cost analysis: a GPU
plan's flops are its convolutions and dots and its bytes each kernel's operands and results,
counted in the optimised HLO (`work_source` says so).

The roofline is the largest of three lower bounds on a step's time (two on GPUs):
  compute      the compiler's flops at the chip's bf16 peak;
  MXU-width    the flops the matrix units execute: every convolution and dot of the optimised
               HLO with its contraction size (input features x window) and its output-feature
               size each rounded up to the MXU width (128 on v4/v5e/v5p, 256 on v6e/tpu7x), at
               the same peak. A 3x3 convolution that makes 12 channels occupies a 128-wide MXU
               as if it made 128: the peak assumes full tiles. Elementwise work is left out (it
               runs on the vector units), so this bound counts only matrix work;
  memory       the compiler's HBM bytes accessed at the chip's HBM bandwidth.
Sources: the MXU is a 128x128 systolic array (https://cloud.google.com/tpu/docs/
system-architecture-tpu-vm); v6e has 256x256 MXUs (https://cloud.google.com/tpu/docs/v6e);
tpu7x's width is JAX's own table (`mxu_column_size=256` for TPU_7X in jax/_src/tpu_info.py,
JAX 0.12.0.1), as Google's tpu7x page does not state it. docs/accelerators.md has the model's
limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

# Compiling for a topology needs libtpu but never a TPU: keep JAX itself on the CPU, and let
# several planners (or tests) load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from train import cli, errors

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: train.main has --config too)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2",
                      "A TPU slice, GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16, v6e:4x4, "
                      "v4:2x2x1, v5p:2x2x1, tpu7x:2x2x1; or GPUs, GENERATION:GPUS or "
                      ":HOSTSxGPUS, e.g. h100:8, h200:2x8, a100:1.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-center network (multislice).")
  flags.DEFINE_bool("max_batch", True,
                    "Also search for the largest per-chip batch whose train step fits in HBM "
                    "(a few more train-step compiles, at most --max_batch_compiles); "
                    "--nomax_batch compiles only the configured batch.")
  flags.DEFINE_integer("max_batch_compiles", 5,
                       "The most train-step compiles the largest-batch search may spend.",
                       lower_bound=1)
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line of the output.")
  flags.DEFINE_string("dump_hlo", None, "A folder for the optimised HLO text of both steps.")


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of one accelerator generation."""

  name: str
  hbm_bytes: int
  bf16_flops_per_s: float
  hbm_bytes_per_s: float
  chip_config: str  # libtpu's chip configuration ("megacore": v4/v5p chips as one device)
  dims: int  # a slice's shape: AxB (2-D torus) or AxBxC (3-D)
  pod_chips: int  # the largest slice: one pod
  mxu_width: int | None  # an MXU multiplies mxu_width x mxu_width tiles (TPUs)
  source: str
  # JAX devices per chip: TPU7x's two TensorCores are two devices (two programs, each with
  # half the chip's HBM), the other generations' chips one.
  devices_per_chip: int = 1
  platform: str = "tpu"
  target: str = ""  # a GPU's name in XLA's target descriptions (device_description_str)


GiB = 1 << 30
# Per chip, from Google Cloud's TPU pages (bf16 peak, HBM capacity and bandwidth, pod size and
# interconnect dimensions), 2026-12. MXU widths: see the module docstring.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "megacore", 3, 4096, 128,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "default", 2, 256, 128,
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "megacore", 3, 8960, 128,
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 32 * GiB, 918e12, 1638e9, "default", 2, 256, 256,
                "https://cloud.google.com/tpu/docs/v6e"),
    "tpu7x": Chip("TPU7x (Ironwood)", 192 * GiB, 2307e12, 7380e9, "default", 3, 9216, 256,
                  "https://cloud.google.com/tpu/docs/tpu7x", devices_per_chip=2),
    # NVIDIA's SXM GPUs, from their datasheets: bf16 dense tensor-core peak (half the figure
    # "with sparsity"), HBM bandwidth; memory as CUDA reports it (device_memory_size in XLA's
    # target description of the GPU). A shape is HOSTSxGPUS, at most the 8 GPUs of an HGX board
    # per host.
    "h100": Chip("NVIDIA H100 SXM", 84_942_979_072, 989e12, 3350e9, "", 2, 8, None,
                 "https://www.nvidia.com/en-us/data-center/h100/", platform="cuda",
                 target="NVIDIA H100 80GB HBM3"),
    "h200": Chip("NVIDIA H200 SXM", 151_397_597_184, 989e12, 4800e9, "", 2, 8, None,
                 "https://www.nvidia.com/en-us/data-center/h200/", platform="cuda",
                 target="NVIDIA H200 141GB HBM3e"),
    "a100": Chip("NVIDIA A100 SXM4 80GB", 85_100_068_864, 312e12, 2039e9, "", 2, 8, None,
                 "https://www.nvidia.com/en-us/data-center/a100/", platform="cuda",
                 target="NVIDIA A100-SXM4-80GB"),
}
# A planner bound on chips over all slices, above the largest published multislice job
# ("50000+ TPU v5e chips", Google Cloud blog, 2023-11-08): larger numbers are typing errors,
# and libtpu would build every one of their devices.
MAX_CHIPS = 1 << 16

# Examples per split of the shipped configs' datasets (tfds catalog), so that planning needs
# no data: (splits, classes, channels).
DATASETS: dict[str, tuple[dict[str, int], int, int]] = {
    "cifar10": ({"train": 50_000, "test": 10_000}, 10, 3),
    "cifar100": ({"train": 50_000, "test": 10_000}, 100, 3),
    "svhn_cropped": ({"train": 73_257, "extra": 531_131, "test": 26_032}, 10, 3),
    "imagenet2012": ({"train": 1_281_167, "validation": 50_000}, 1000, 3),
    "imagenette/320px-v2": ({"train": 9_469, "validation": 3_925}, 10, 3),
    "sklearn_digits": ({"train": 1_437, "test": 360}, 10, 1),
}


def split_size(dataset: str, split: str, field: str = "train_split") -> int:
  """Examples in a tfds split expression such as 'train', 'train+extra' or 'train[:90%]'."""
  splits = DATASETS[dataset][0]
  total = 0
  for part in split.split("+"):
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", part)
    if not m or m.group(1) not in splits:
      raise errors.ConfigError(
          f"--config.{field}={split}: cannot size this split of {dataset} (splits: "
          f"{', '.join(splits)}).")
    n = splits[m.group(1)]

    def bound(text: str | None, default: int) -> int:
      if text is None:
        return default
      value = int(text.rstrip("%"))
      value = round(value * n / 100) if text.endswith("%") else value
      return min(n, max(0, value + n if value < 0 else value))

    total += max(0, bound(m.group(3), n) - bound(m.group(2), 0))
  return total


def _hosts_and_gpus(topology: str) -> tuple[int, int]:
  """(hosts, GPUs per host) of GENERATION:GPUS or GENERATION:HOSTSxGPUS (or ...xHOSTSxGPUS)."""
  sides = [int(s) for s in topology.partition(":")[2].split("x")]
  return (1, sides[0]) if len(sides) == 1 else (sides[-2], sides[-1])


def check_topology(topology: str, num_slices: int = 1) -> Chip:
  """The chip of `topology` if the slice can exist (libtpu dies of SIGFPE on a zero dimension)."""
  generation, _, shape = topology.partition(":")
  if generation not in CHIPS or not shape:
    raise errors.ConfigError(
        f"--topology={topology}: expected GENERATION:SHAPE with GENERATION one of "
        f"{', '.join(CHIPS)}, e.g. v5e:2x2, v4:2x2x1 or h100:8.")
  chip = CHIPS[generation]
  example = "8" if chip.platform == "cuda" else "2x2" if chip.dims == 2 else "2x2x1"
  sides = shape.split("x")
  if not all(re.fullmatch(r"\d+", s) and int(s) > 0 for s in sides):
    raise errors.ConfigError(
        f"--topology={topology}: every dimension must be a positive integer, e.g. "
        f"{generation}:{example}.")
  if chip.platform == "cuda":
    hosts, gpus = _hosts_and_gpus(topology)
    if len(sides) > 2 or gpus > chip.pod_chips or hosts * gpus > MAX_CHIPS or num_slices != 1:
      raise errors.ConfigError(
          f"--topology={topology} --num_slices={num_slices}: GPUs are GENERATION:GPUS or "
          f"GENERATION:HOSTSxGPUS with at most {chip.pod_chips} GPUs per host and "
          f"{MAX_CHIPS:,} in all, one slice, e.g. {generation}:8 or {generation}:2x8.")
    return chip
  if len(sides) != chip.dims:
    raise errors.ConfigError(
        f"--topology={topology}: {chip.name} slices are {chip.dims}-D "
        f"({'x'.join('ABC'[:chip.dims])}), e.g. {generation}:{example}.")
  chips = math.prod(int(s) for s in sides)
  if chips > chip.pod_chips:
    raise errors.ConfigError(
        f"--topology={topology}: {chips:,} chips, more than a {chip.name} pod "
        f"({chip.pod_chips:,} chips, {chip.source}); plan a slice of at most "
        f"{chip.pod_chips:,} chips, or several with --num_slices.")
  if num_slices < 1 or chips * num_slices > MAX_CHIPS:
    raise errors.ConfigError(
        f"--num_slices={num_slices}: must be between 1 and {MAX_CHIPS // chips:,} for "
        f"{topology} (at most {MAX_CHIPS:,} chips in all, above the largest published "
        f"multislice job).")
  return chip


def tpu_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list[Any]]:
  """The chip figures and the devices of a named TPU topology (chip.devices_per_chip a chip)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  chip = check_topology(topology, num_slices)
  if importlib.util.find_spec("libtpu") is None:
    raise errors.ConfigError("Planning for a TPU needs libtpu (no TPU is needed): "
                             "pip install -e '.[tpu]'.")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    with cli.stderr_to(os.devnull):  # libtpu's warnings that no TPU is attached
      topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                          chip_config_name=chip.chip_config,
                                          num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(
        f"--topology={topology} --num_slices={num_slices}: libtpu does not know this "
        f"topology ({str(e).splitlines()[0] if str(e) else type(e).__name__}). Use a slice "
        f"shape Google Cloud sells, e.g. v5e:2x2, v5e:16x16, v6e:4x4, v4:2x2x1.") from e
  return chip, list(topo.devices)


def gpu_target_config(name: str) -> str:
  """XLA's description of the GPU called `name` (a text proto), as JAX's CUDA plugin embeds it.

  The plugin's compiler reads exactly the descriptions it was built with, so they are taken
  from its own library rather than from a copy that could drift from it.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import mmap  # pylint: disable=g-import-not-at-top
  plugins = [importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)]
  found = next((p for p in plugins if p is not None and p.origin), None)
  if found is None:
    raise errors.ConfigError(
        "Planning for a GPU needs JAX's CUDA plugin and ptxas (no GPU or driver): pip install "
        "'jax-cuda12-plugin==JAX_VERSION' nvidia-cuda-nvcc-cu12 (JAX_VERSION: `pip show jax`).")
  library = os.path.join(os.path.dirname(found.origin), "xla_cuda_plugin.so")
  with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
    at = data.find(f'device_description_str: "{name}"\n'.encode())
    if at < 0:
      raise errors.ConfigError(f"JAX's CUDA plugin ({library}) has no target description of "
                               f"{name}: plan with another GPU, or another plugin version.")
    return data[data.rfind(b"\0", 0, at) + 1:data.find(b"\0", at)].decode()


def gpu_devices(topology: str) -> tuple[Chip, list[Any]]:
  """The GPU figures and the devices of `topology` (GENERATION:GPUS or :HOSTSxGPUS)."""
  chip = check_topology(topology)
  hosts, gpus = _hosts_and_gpus(topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(
      chip.target), topology=f"1x{hosts}x{gpus}")  # partitions x hosts x devices per host
  return chip, list(topo.devices)


def accelerator_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list[Any]]:
  """The chip figures and the devices of a TPU or GPU topology."""
  chip = CHIPS.get(topology.partition(":")[0])
  if chip is not None and chip.platform == "cuda":
    check_topology(topology, num_slices)
    return gpu_devices(topology)
  return tpu_devices(topology, num_slices)


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


def largest_fitting_batch(fits_at: Callable[[int], float | None], batch: int,
                          memory: float | None, fitted: bool, hbm: int, step: int = 1,
                          max_compiles: int = 5,
                          progress: Callable[[str], None] = lambda _: None,
                          ) -> tuple[int, int | None, list[int]]:
  """The largest per-chip batch (a multiple of `step`) whose train step compiles within HBM.

  `fits_at(b)` compiles at batch b and returns its memory, or raises OutOfMemory, which
  carries the memory the compiler needed. Memory is nearly linear in the batch, so the search
  scales the batch as if all memory grew with it (an undershoot, since parameters do not),
  extrapolates the line through the two largest fitting batches, and confirms the answer by
  compiling the batch after it; a failure brackets the answer, and the search interpolates (or
  bisects) inside the bracket. For a linear memory curve that is 3 compiles; the compiler's
  re-planning near the limit can take more, but never more than `max_compiles`. `progress`
  hears one line per compile, before it starts and with its outcome.
  Returns (largest fitting, smallest known not fitting or None, batches compiled).
  """
  known: dict[int, float | None] = {batch: memory}
  outcome: dict[int, bool] = {batch: fitted}
  compiled: list[int] = []
  while len(compiled) < max_compiles:
    lo = max((b for b, ok in outcome.items() if ok), default=0)
    hi = min((b for b, ok in outcome.items() if not ok), default=None)
    if hi is not None and hi - lo <= step:
      break
    fitting = sorted((b, m) for b, m in known.items() if outcome[b] and m)
    slope = ((fitting[-1][1] - fitting[-2][1]) / (fitting[-1][0] - fitting[-2][0])
             if len(fitting) >= 2 else 0.0)
    if hi is not None and compiled and outcome[compiled[-1]]:
      guess = lo + step  # the last guess fitted: does the next batch fail?
    elif hi is not None and known.get(hi) and lo > 0 and known[hi] > known[lo]:
      # between the largest fitting and the smallest failing batch, memory is ~linear
      guess = lo + (hbm - known[lo]) * (hi - lo) / (known[hi] - known[lo])
    elif hi is not None:
      guess = (lo + hi) / 2
    elif slope > 0:
      guess = lo + (hbm - known[lo]) / slope  # the line through the two largest fitting
    elif lo > 0 and known[lo]:
      guess = lo * hbm / known[lo]  # as if all memory grew with the batch: an undershoot
    else:
      guess = 2 * max(lo, 1)
    guess = int(guess) // step * step
    if guess <= lo or (hi is not None and guess >= hi):
      guess = (lo + step if hi is None else (lo + hi) // 2 // step * step)
      if guess <= lo:
        guess = lo + step
    if hi is not None and guess >= hi:
      break
    progress(f"  compile {len(compiled) + 1} of at most {max_compiles}: {guess} images per "
             f"chip...")
    try:
      known[guess] = fits_at(guess)
      outcome[guess] = True
      progress(f"    fits ({_bytes(known[guess])})" if known[guess] else "    fits")
    except OutOfMemory as e:
      known[guess], outcome[guess] = e.required_bytes, False
      progress("    does not fit" + (f" (needs {_bytes(e.required_bytes)})"
                                     if e.required_bytes else ""))
    compiled.append(guess)
  lo = max((b for b, ok in outcome.items() if ok), default=0)
  hi = min((b for b, ok in outcome.items() if not ok), default=None)
  return lo, hi, compiled


@dataclasses.dataclass(frozen=True)
class Plan:
  """One run planned on one topology: figures per chip unless named global; None where the
  step they describe did not fit, where the chip has no such unit (the MXU fields on GPUs), or,
  for the max_batch fields, where no search was asked for."""

  # The run, as the trainer would lay it out.
  topology: str
  num_slices: int
  chip: str
  chips: int
  processes: int
  model: str
  dataset: str
  dtype: str
  memory_efficient: bool
  global_batch: int
  per_chip_batch: int
  eval_per_chip_batch: int
  steps_per_epoch: int
  total_steps: int
  # The chip's published figures.
  hbm_bytes: int
  chip_bf16_flops_per_s: float
  chip_hbm_bytes_per_s: float
  chip_mxu_width: int | None  # TPUs only
  chip_source: str
  # Both steps fit in HBM.
  fits: bool
  # The train step: what the compiler needs when it does not fit, else its memory and work.
  per_chip_required_bytes: float | None = None
  per_chip_argument_bytes: int | None = None
  per_chip_output_bytes: int | None = None
  per_chip_alias_bytes: int | None = None
  per_chip_temp_bytes: int | None = None
  per_chip_generated_code_bytes: int | None = None
  per_chip_peak_bytes: int | None = None
  headroom_bytes: int | None = None
  flops_per_step: float | None = None
  bytes_accessed_per_step: float | None = None
  work_source: str | None = None  # where flops and bytes accessed come from
  matmul_flops_per_step: float | None = None  # convolutions and dots, from the HLO
  mxu_flops_per_step: float | None = None  # the same padded to the MXU width
  flops_per_image: float | None = None
  bytes_accessed_per_image: float | None = None
  mxu_flops_per_image: float | None = None
  # The train step's roofline: three lower bounds (module docstring) and the one that binds.
  compute_bound_seconds: float | None = None
  mxu_bound_seconds: float | None = None
  memory_bound_seconds: float | None = None
  roofline_step_seconds: float | None = None
  bound: str | None = None
  roofline_images_per_s: float | None = None
  roofline_images_per_s_global: float | None = None
  compute_fraction_of_peak: float | None = None
  epoch_seconds: float | None = None
  run_seconds: float | None = None
  chip_hours: float | None = None
  compile_seconds: float | None = None
  compile_cpu_seconds: float | None = None
  # The eval step.
  eval_per_chip_required_bytes: float | None = None
  eval_per_chip_peak_bytes: int | None = None
  eval_per_chip_temp_bytes: int | None = None
  eval_flops_per_step: float | None = None
  eval_bytes_accessed_per_step: float | None = None
  eval_mxu_flops_per_step: float | None = None
  eval_compile_seconds: float | None = None
  eval_compile_cpu_seconds: float | None = None
  # The largest-batch search (--max_batch).
  max_per_chip_batch: int | None = None
  max_batch_not_fitting: int | None = None
  max_batch_compiles: list[int] | None = None
  estimate: str = "compiler estimates (ahead-of-time compile), not hardware measurements"

  def asdict(self) -> dict[str, Any]:
    """Every field by name: the planner's --json object."""
    return dataclasses.asdict(self)


def _train_figures(train: StepCost, evaluate: StepCost | None, chip: Chip, per_chip: int,
                   chips: int, eval_steps: int, evals: int, steps_per_epoch: int,
                   total_steps: int, eval_every_epochs: int) -> dict[str, Any]:
  """The Plan fields that follow from a train step that fits."""
  bounds = bound_seconds(train, chip)
  step_seconds, bound = roofline_seconds(train, chip)
  eval_pass = eval_steps * roofline_seconds(evaluate, chip)[0] if evaluate else 0.0
  run_seconds = total_steps * step_seconds + evals * eval_pass
  return dict(
      per_chip_argument_bytes=train.argument_bytes, per_chip_output_bytes=train.output_bytes,
      per_chip_alias_bytes=train.alias_bytes, per_chip_temp_bytes=train.temp_bytes,
      per_chip_generated_code_bytes=train.generated_code_bytes,
      per_chip_peak_bytes=train.peak_bytes,
      headroom_bytes=chip.hbm_bytes - max(train.peak_bytes,
                                          evaluate.peak_bytes if evaluate else 0),
      flops_per_step=train.flops, bytes_accessed_per_step=train.bytes_accessed,
      work_source=("the optimised HLO: convolutions and dots (elementwise work left out), "
                   "each kernel's operands and results" if train.from_hlo
                   else "the compiler's cost analysis") + (
                       f" (its {train.loops} loop bodies counted once each)" if train.loops
                       else ""),
      matmul_flops_per_step=train.matmul.flops,
      mxu_flops_per_step=train.matmul.mxu_flops if chip.mxu_width else None,
      flops_per_image=train.flops / per_chip,
      bytes_accessed_per_image=train.bytes_accessed / per_chip,
      mxu_flops_per_image=train.matmul.mxu_flops / per_chip if chip.mxu_width else None,
      compute_bound_seconds=bounds["compute"], mxu_bound_seconds=bounds.get("MXU-width compute"),
      memory_bound_seconds=bounds["HBM bandwidth"],
      roofline_step_seconds=step_seconds, bound=bound,
      roofline_images_per_s=per_chip / step_seconds,
      roofline_images_per_s_global=per_chip * chips / step_seconds,
      compute_fraction_of_peak=train.flops / chip.bf16_flops_per_s / step_seconds,
      epoch_seconds=steps_per_epoch * step_seconds + eval_pass / eval_every_epochs,
      run_seconds=run_seconds, chip_hours=run_seconds * chips / 3600,
      compile_seconds=train.compile_seconds, compile_cpu_seconds=train.compile_cpu_seconds)


def plan(config: Any, topology: str, num_slices: int = 1, max_batch: bool = True,
         progress: Callable[[str], None] = lambda _: None, model: Any = None,
         max_batch_compiles: int = 5, hlo_dir: str | None = None) -> Plan:
  """Compiles the run's train and eval steps for `topology` and says what they need per chip.

  `model` replaces the configured one (any flax module with the same `apply` signature and
  variable collections, e.g. a textbook DenseNet to compare against). `max_batch` also
  searches for the largest per-chip batch that fits, in at most `max_batch_compiles` compiles.
  """
  from train import step as step_lib, validation  # pylint: disable=g-import-not-at-top
  validation.validate(config)
  if config.dataset not in DATASETS:
    raise errors.ConfigError(
        f"--config.dataset={config.dataset}: the planner knows the sizes of "
        f"{', '.join(DATASETS)}; plan with one of them at the same image size.")
  _, num_classes, channels = DATASETS[config.dataset]
  num_train = split_size(config.dataset, config.train_split)
  num_eval = split_size(config.dataset, config.eval_split, "eval_split")
  chip, devices = accelerator_devices(topology, num_slices)
  chips = len(devices) // chip.devices_per_chip
  processes = len({d.process_index for d in devices})
  # the trainer's own batch errors: it splits batches over devices
  batches = validation.batches(config, len(devices), processes)
  steps_per_epoch, total_steps = validation.run_length(config, num_train)
  if model is None:
    model = step_lib.create_model(config, num_classes, channels, platform=chip.platform)
  tx = step_lib.create_optimizer(
      config, step_lib.learning_rate_fn(config, steps_per_epoch, total_steps))
  mesh = step_lib.make_mesh(devices)
  image = (config.image_size, config.image_size, channels)
  state = step_lib.abstract_train_state(model, tx, (1, *image), mesh, config.seed)

  def hlo_path(name: str) -> str | None:
    if not hlo_dir:
      return None
    os.makedirs(hlo_dir, exist_ok=True)
    return os.path.join(hlo_dir, f"{name}.hlo.txt")

  def per_chip_cost(make_step: Callable[[Any], Any], batch: Any, hlo: str | None,
                    work: bool = True) -> StepCost:
    try:
      cost = compile_cost(make_step(model), state, batch, mxu_width=chip.mxu_width,
                          hlo_path=hlo)
      if work and cost.loops and hasattr(model, "unroll_layers"):
        # XLA's cost analysis counts a loop body once: the work is that of the same step
        # with every layer unrolled, its memory and compile time the step's own.
        progress("  ...and its loop-free form, for its flops and bytes accessed...")
        unrolled = compile_cost(make_step(model.clone(unroll_layers=True)), state, batch,
                                mxu_width=chip.mxu_width)
        cost = dataclasses.replace(cost, flops=unrolled.flops, matmul=unrolled.matmul,
                                   bytes_accessed=unrolled.bytes_accessed,
                                   loops=unrolled.loops)
    except OutOfMemory as e:
      if e.required_bytes:
        e.required_bytes *= chip.devices_per_chip
      raise
    cost = cost.times(chip.devices_per_chip)
    if cost.peak_bytes > chip.hbm_bytes:  # XLA:GPU compiles steps of any size
      raise OutOfMemory(f"{cost.peak_bytes} bytes", required_bytes=cost.peak_bytes)
    return cost

  def train_cost(per_chip: int, hlo: str | None = None, work: bool = True) -> StepCost:
    resized = config.copy_and_resolve_references()
    with resized.unlocked():
      resized.batch_size = per_chip * chips
    return per_chip_cost(lambda m: step_lib.make_train_step(m, tx, resized, mesh),
                         step_lib.abstract_batch(mesh, per_chip * chips, image), hlo, work)

  per_chip = batches.train // chips
  progress(f"Compiling the train step for {topology} ({chips} chips, {per_chip} images per "
           f"chip)...")
  train: StepCost | None = None
  needed: dict[str, Any] = {}
  try:
    train = train_cost(per_chip, hlo_path("train_step"))
  except OutOfMemory as e:
    needed["per_chip_required_bytes"] = e.required_bytes
  progress(f"Compiling the eval step ({batches.eval // chips} images per chip)...")
  evaluate: StepCost | None = None
  try:
    evaluate = per_chip_cost(
        lambda m: step_lib.make_eval_step(m, mesh),
        step_lib.abstract_batch(mesh, batches.eval, image, eval_batch=True),
        hlo_path("eval_step"))
  except OutOfMemory as e:
    needed["eval_per_chip_required_bytes"] = e.required_bytes
  figures: dict[str, Any] = {}
  if evaluate is not None:
    figures.update(eval_per_chip_peak_bytes=evaluate.peak_bytes,
                   eval_per_chip_temp_bytes=evaluate.temp_bytes,
                   eval_flops_per_step=evaluate.flops,
                   eval_bytes_accessed_per_step=evaluate.bytes_accessed,
                   eval_mxu_flops_per_step=evaluate.matmul.mxu_flops if chip.mxu_width else None,
                   eval_compile_seconds=evaluate.compile_seconds,
                   eval_compile_cpu_seconds=evaluate.compile_cpu_seconds)
  if train is not None:
    figures.update(_train_figures(
        train, evaluate, chip, per_chip, chips, eval_steps=math.ceil(num_eval / batches.eval),
        evals=max(1, (total_steps // steps_per_epoch) // config.eval_every_epochs),
        steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        eval_every_epochs=config.eval_every_epochs))
  if max_batch:
    progress(f"Finding the largest per-chip batch that fits (at most {max_batch_compiles} more "
             f"train-step compiles)...")
    best, over, compiled = largest_fitting_batch(
        lambda b: train_cost(b, work=False).peak_bytes, per_chip,
        train.peak_bytes if train else needed.get("per_chip_required_bytes"), train is not None,
        chip.hbm_bytes, step=math.lcm(8 if per_chip % 8 == 0 else 1, chip.devices_per_chip),
        max_compiles=max_batch_compiles,
        progress=progress)
    figures.update(max_per_chip_batch=best, max_batch_not_fitting=over,
                   max_batch_compiles=compiled)
  return Plan(
      topology=topology, num_slices=num_slices, chip=chip.name, chips=chips,
      processes=processes, model=config.model, dataset=config.dataset,
      dtype="bfloat16" if config.half_precision else "float32",
      memory_efficient=config.memory_efficient, global_batch=batches.train,
      per_chip_batch=per_chip, eval_per_chip_batch=batches.eval // chips,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps, hbm_bytes=chip.hbm_bytes,
      chip_bf16_flops_per_s=chip.bf16_flops_per_s, chip_hbm_bytes_per_s=chip.hbm_bytes_per_s,
      chip_mxu_width=chip.mxu_width, chip_source=chip.source,
      estimate=f"compiler estimates (ahead-of-time {'GPU' if chip.platform == 'cuda' else 'TPU'} "
               f"compile), not hardware measurements",
      fits=train is not None and evaluate is not None, **needed, **figures)


def _bytes(n: float) -> str:
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def _duration(s: float) -> str:
  return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.2f} s"


def report(p: Plan) -> str:
  """The plan as the lines a person reads."""
  lines = [
      f"{p.model} on {p.topology}" + (f" x{p.num_slices} slices" if p.num_slices > 1 else "") +
      f": {p.chips} x {p.chip} chips, {p.processes} host(s); {p.dtype}, "
      f"batch {p.global_batch} ({p.per_chip_batch} per chip)"
      + (", memory_efficient" if p.memory_efficient else ""),
      f"Per chip, {p.estimate}:",
  ]
  if p.per_chip_peak_bytes is None:
    needed = p.per_chip_required_bytes
    lines.append(f"  memory      DOES NOT FIT: the compiler needs "
                 f"{_bytes(needed) if needed else 'more than'} of {_bytes(p.hbm_bytes)} HBM "
                 f"for the train step")
  else:
    lines += [
        f"  memory      arguments {_bytes(p.per_chip_argument_bytes)}, temporaries "
        f"{_bytes(p.per_chip_temp_bytes)}, in all {_bytes(p.per_chip_peak_bytes)} of "
        f"{_bytes(p.hbm_bytes)} HBM: {'fits' if p.fits else 'DOES NOT FIT'} (headroom "
        f"{_bytes(p.headroom_bytes)})" +
        (f"; eval step {_bytes(p.eval_per_chip_peak_bytes)}"
         if p.eval_per_chip_peak_bytes is not None else "; eval step DOES NOT FIT"),
        f"  work        {p.flops_per_step / 1e12:.3f} TFLOP and "
        f"{p.bytes_accessed_per_step / 1e9:.2f} GB accessed per step; "
        f"{p.flops_per_image / 1e9:.2f} GFLOP and {p.bytes_accessed_per_image / 1e6:.1f} "
        f"MB per image, from {p.work_source}" +
        (f"; {p.mxu_flops_per_image / 1e9:.2f} GFLOP per image as the {p.chip_mxu_width}-wide "
         f"MXU executes the convolutions and dots "
         f"({p.matmul_flops_per_step / p.mxu_flops_per_step:.0%} of its tiles used)"
         if p.mxu_flops_per_step else ""),
        f"  bounds      compute {p.compute_bound_seconds * 1e3:.3g} ms, " +
        (f"MXU-width compute {p.mxu_bound_seconds * 1e3:.3g} ms, "
         if p.mxu_bound_seconds is not None else "") +
        f"HBM bandwidth {p.memory_bound_seconds * 1e3:.3g} ms per step",
        f"  roofline    {p.roofline_step_seconds * 1e3:.2f} ms per step, bound by "
        f"{p.bound} ({p.compute_fraction_of_peak:.0%} of the bf16 peak): "
        f"{p.roofline_images_per_s:,.0f} images/s per chip, "
        f"{p.roofline_images_per_s_global:,.0f} in all",
        f"  run         {p.steps_per_epoch} steps per epoch, "
        f"{_duration(p.epoch_seconds)} per epoch at the roofline; {p.total_steps} steps: "
        f"{_duration(p.run_seconds)}, {p.chip_hours:,.1f} chip-hours",
        f"  compile     train step {p.compile_seconds:.1f} s "
        f"({p.compile_cpu_seconds:.0f} CPU-s here)" +
        (f", eval step {p.eval_compile_seconds:.1f} s" if p.eval_compile_seconds is not None
         else ""),
    ]
  if p.max_batch_compiles is not None:
    bracket = (f"{p.max_batch_not_fitting} does not" if p.max_batch_not_fitting is not None
               else "no larger batch was tried to fail")
    lines.append(f"  max batch   {p.max_per_chip_batch} per chip fits, {bracket} "
                 f"(compiled: {p.max_batch_compiles})" if p.max_per_chip_batch else
                 f"  max batch   no batch compiled fits (compiled: {p.max_batch_compiles})")
  lines.append(f"Chip figures: {p.chip_bf16_flops_per_s / 1e12:g} TFLOP/s bf16, "
               f"{p.chip_hbm_bytes_per_s / 1e9:g} GB/s HBM, {_bytes(p.hbm_bytes)}"
               + (f", {p.chip_mxu_width}-wide MXU" if p.chip_mxu_width else "") +
               f" ({p.chip_source}).")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """Plans the configured run on --topology and prints the report (and JSON)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.require_config(FLAGS.config)
  try:
    result = plan(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.max_batch,
                  progress=lambda text: print(text, flush=True),
                  max_batch_compiles=FLAGS.max_batch_compiles, hlo_dir=FLAGS.dump_hlo)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(report(result))
  if FLAGS.json:
    print(json.dumps(result.asdict()))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, __doc__))
