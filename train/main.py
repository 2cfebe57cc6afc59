"""`python -m train.main --config configs/cifar_bc.py --workdir /tmp/run [--config.x=y ...]`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF loads: no C++ info spam

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

import jax

from train import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  """Trains and evaluates; prints the final test accuracy."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  logging.info("JAX %s: %d processes, %d devices (%s).", jax.__version__, jax.process_count(),
               jax.device_count(), jax.default_backend())
  metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if metrics and jax.process_index() == 0:
    print(f"Final test accuracy: {metrics['accuracy']:.4f} "
          f"({int(metrics['examples'])} examples)", flush=True)


if __name__ == "__main__":
  app.run(main)
