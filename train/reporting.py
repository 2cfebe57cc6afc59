"""What a run shows and records: a progress bar (or log lines), TensorBoard and metrics.jsonl.

Only process 0 reports. On a terminal a tqdm bar moves every step with rate and ETA, and
messages print above it; otherwise (a log file, a pod's stdout) every line is plain text.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import tqdm
from etils import epath


class Reporter:
  """Console progress and messages, TensorBoard scalars and `<workdir>/metrics.jsonl`."""

  def __init__(self, workdir: epath.Path | None, total_steps: int):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.interactive = self.active and sys.stdout.isatty()
    self.bar: tqdm.tqdm | None = None
    self.tensorboard = self.jsonl = None
    if self.active and workdir is not None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self.tensorboard = metric_writers.SummaryWriter(str(workdir / "tensorboard"))
      self.jsonl = (workdir / "metrics.jsonl").open("a")

  def message(self, text: str) -> None:
    """A line on the console (above the progress bar, if one is shown)."""
    if not self.active:
      return
    if self.bar is not None:
      self.bar.write(text, file=sys.stdout)
    else:
      print(text, flush=True)

  def start(self, step: int) -> None:
    """Starts the progress bar at `step` (a terminal only)."""
    if self.interactive:
      self.bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step", file=sys.stdout,
                           dynamic_ncols=True, smoothing=0.1)

  def advance(self, step: int) -> None:
    """Moves the progress bar to `step` (called every step)."""
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def write(self, step: int, kind: str, scalars: dict[str, float]) -> None:
    """Records one set of scalars at a step, and shows it."""
    if not self.active:
      return
    if self.tensorboard is not None:
      self.tensorboard.write_scalars(step, {f"{kind}/{k}": v for k, v in scalars.items()})
      self.jsonl.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")
      self.jsonl.flush()
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    if self.bar is not None and kind == "train":
      self.bar.set_postfix_str(f"loss={scalars['loss']:.4g}", refresh=False)
    self.message(f"[{kind} step {step}/{self.total_steps}] {text}")

  def close(self) -> None:
    """Closes the bar and flushes the writers."""
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.jsonl.close()
      self.tensorboard = self.jsonl = None


def summary_block(rows: list[tuple[str, Any]]) -> str:
  """Aligned 'name  value' lines: the start-up summary of a run."""
  width = max(len(name) for name, _ in rows)
  return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)

