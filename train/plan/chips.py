"""The accelerators a plan is for: published chip figures, topology checks, their devices,
and the sizes of the shipped datasets (planning needs no data)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from train import cli, errors


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
