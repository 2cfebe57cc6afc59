"""`python -m train.main --config configs/cifar_bc.py --workdir /tmp/run [--config.x=y ...]`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF loads: no C++ info spam

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

import jax

from train import distributed, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs outside a detected cluster "
                    "(TPU pods, SLURM and Open MPI are detected automatically).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "A peer silent this long is declared dead and the run stops with an error.")
flags.DEFINE_integer("initialization_timeout_seconds", 300,
                     "How long to wait for every process to join.")
flags.mark_flags_as_required(["config", "workdir"])


def run(argv: list[str]) -> tuple[train.TrainState, dict[str, float]]:
  """Joins the distributed runtime if needed, then trains and evaluates."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.heartbeat_timeout_seconds, FLAGS.initialization_timeout_seconds)
  logging.info("JAX %s: %d processes, %d devices (%s).", jax.__version__, jax.process_count(),
               jax.device_count(), jax.default_backend())
  return train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def main(argv: list[str]) -> None:
  """Trains and evaluates; prints the final test accuracy."""
  _, metrics = run(argv)
  if metrics and jax.process_index() == 0:
    print(f"Final test accuracy: {metrics['accuracy']:.4f} "
          f"({int(metrics['examples'])} examples)", flush=True)


if __name__ == "__main__":
  app.run(main)
