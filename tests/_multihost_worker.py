"""`python -m train.main` plus a dump of this process's final params (multi-host tests).

Usage: python tests/_multihost_worker.py <train.main flags> DUMP.npz
"""

import sys

import jax
import numpy as np
from absl import app

from train import main as train_main

DUMP = sys.argv.pop()


def worker(argv: list[str]) -> None:
  del argv  # parsed into FLAGS by app.run
  state, metrics, _ = train_main.run()
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  arrays = {jax.tree_util.keystr(k): np.asarray(v.addressable_data(0)) for k, v in leaves}
  np.savez(DUMP, accuracy=metrics["accuracy"], examples=metrics["examples"],
           process_count=jax.process_count(), **arrays)


if __name__ == "__main__":
  app.run(worker)
