"""PyTorch peers: torchvision DenseNets, one SGD training step, timed like train_step.py.

  bc100        torchvision.models.densenet.DenseNet(growth_rate=12, block_config=(16,16,16),
               num_init_features=24, bn_size=4, num_classes=10) with the CIFAR stem of
               densenet_jax: features.conv0 -> 3x3 stride-1 conv (no bias), and pool0, norm0,
               relu0 removed (densenet_jax's CIFAR stem is the bare conv; only then does the
               parameter count equal 769,162 -- with norm0 it is 769,210). 32x32 input.
  densenet121  torchvision.models.densenet121(weights=None), 224x224.

Modes: eager NCHW, eager channels_last, and torch.compile (inductor) of the whole training
step where it works. Optimiser as in the paper and densenet_jax: SGD lr 0.1, Nesterov
momentum 0.9, weight decay 1e-4 (coupled, torch-style); cross-entropy; train-mode BN.
torch.set_num_threads(--threads, default 2 = this machine's cores).

    python benchmarks/peers_torch.py --model bc100 --batch 64 --mode eager_nchw
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ("eager_nchw", "eager_channels_last", "compile_nchw", "compile_channels_last")
BC100_PARAMS = 769_162


def build(model: str, memory_efficient: bool):
  """(net, image size, classes, parameter count) of a torchvision-style DenseNet."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from torchvision.models import densenet  # pylint: disable=g-import-not-at-top
  if model == "bc100":
    net = densenet.DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24,
                            bn_size=4, num_classes=10, memory_efficient=memory_efficient)
    net.features.conv0 = nn.Conv2d(3, 24, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.features.conv0.weight)
    del net.features.norm0, net.features.relu0, net.features.pool0
    params = sum(p.numel() for p in net.parameters())
    assert params == BC100_PARAMS, params
    return net, 32, 10, params
  if model == "densenet121":
    net = torchvision.models.densenet121(weights=None, memory_efficient=memory_efficient)
    return net, 224, 1000, sum(p.numel() for p in net.parameters())
  raise ValueError(model)


def measure(model: str, batch: int, mode: str, steps: int, warmup: int, threads: int,
            memory_efficient: bool = False) -> dict[str, Any]:
  """Times `steps` SGD steps of the torch peer after `warmup` untimed ones."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  net, size, classes, params = build(model, memory_efficient)
  channels_last = mode.endswith("channels_last")
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  net = net.to(memory_format=fmt).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)
  x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
  y = torch.randint(0, classes, (batch,))

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    return loss

  if mode.startswith("compile"):
    step = torch.compile(step)
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  step(x, y)  # eager: warm caches; compile: trace + inductor codegen
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    loss = step(x, y)
    float(loss.detach())
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return {
      "bench": "peer", "peer": "torch", "torch": torch.__version__, "model": model,
      "params": params, "batch": batch, "image": size, "mode": mode,
      "memory_efficient": memory_efficient, "threads": threads,
      "first_step_s": round(compile_s, 2), "steps": steps, **_common.timing(times, batch),
      "loss": round(float(loss), 4), "load_before": load_before, "load_after": _common.loadavg(),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures one peer configuration and prints its JSON row."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=("bc100", "densenet121"), default="bc100")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--mode", choices=MODES, default="eager_nchw")
  p.add_argument("--memory-efficient", action="store_true",
                 help="torchvision's memory_efficient (checkpointed bottleneck)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args(argv)
  row = measure(args.model, args.batch, args.mode, args.steps, args.warmup, args.threads,
                args.memory_efficient)
  _common.emit(row)
  return row


if __name__ == "__main__":
  main()
