"""Trains and evaluates a DenseNet.

    python -m train.main --config configs/cifar_bc.py --workdir /tmp/run [--config.FIELD=VALUE ...]
    python -m train.main --config configs/cifar_bc.py --print_config   # every field, explained

Exit codes: 0 done, or checkpointed after a notice: SIGTERM, SIGHUP (the terminal closed) or
SIGQUIT (Ctrl-\\, which first prints every thread's stack); 2 usage error (a bad flag, a missing
config file); 1 a run-time failure the user can fix (config, data, workdir, disk, checkpoints:
one message naming the fix; --verbosity=1 or DENSENET_JAX_TRACEBACK=1 adds the traceback); 130
after Ctrl-C (the first checkpoints the step reached, or lets the final save and evaluation
finish; a second stops at once); 143, 129, 131 after a SIGTERM, SIGHUP, SIGQUIT during start-up
(128 + the signal's number: nothing to save).
"""

import contextlib
import errno
import logging as stdlib_logging
import os
import signal
import sys


def _ctrl_c_while_importing(signum, frame) -> None:
  del signum, frame
  os.write(2, b"Stopped by Ctrl-C during start-up: nothing was saved.\n")
  os._exit(130)


if __name__ == "__main__":  # imports take seconds: no KeyboardInterrupt traceback from them
  signal.signal(signal.SIGINT, _ctrl_c_while_importing)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF loads: no C++ info spam

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

import jax

from configs import default
from densenet_jax import pretrained
from train import checkpointing, cli, distributed, errors, preemption, train, workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.DEFINE_bool("print_config", False,
                  "Print every config field with its value and meaning, then exit.")
flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                  "auto: join a cluster JAX detects (TPU pod, SLURM, Open MPI, k8s) or the "
                  "--coordinator_address flags, else run as one process; on: require one; off.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs outside a detected cluster.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "A peer silent this long is declared dead and the run stops with an error.")
flags.DEFINE_integer("initialization_timeout_seconds", 300,
                     "How long to wait for every process to join.")


def _import_tensorflow_quietly() -> None:
  """Imports TF with its C++ start-up lines (oneDNN, absl pre-init) sent to /dev/null."""
  if "tensorflow" not in sys.modules:
    with cli.stderr_to(os.devnull), contextlib.suppress(ImportError):
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def _quiet() -> None:
  """Without --verbosity: warnings only (orbax logs every file it writes at INFO), and each
  event reported once, by `main`, not also as a bare 'Exception ignored' traceback: a failed
  background write (orbax's logged traceback, and the 'Event loop is closed' errors
  tensorstore's threads raise once orbax has torn its loop down), and a SIGTERM or Ctrl-C
  during start-up whose handler ran inside a callback (a GC callback, a __del__), where Python
  swallows the exception; Preemption.start_training raises it again."""
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno < stdlib_logging.ERROR or "/orbax/" not in record.pathname)
  noise = lambda e: isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
  sys.excepthook = lambda kind, e, tb: noise(e) or sys.__excepthook__(kind, e, tb)
  swallowed = lambda e: noise(e) or isinstance(e, preemption.Preempted)
  sys.unraisablehook = lambda u: swallowed(u.exc_value) or sys.__unraisablehook__(u)


def run() -> tuple[train.TrainState, dict[str, float], preemption.Preemption]:
  """Joins the distributed runtime if there is one, then trains and evaluates; also returns
  the notice that says whether (and how) the run was asked to stop."""
  try:
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, FLAGS.heartbeat_timeout_seconds,
                           FLAGS.initialization_timeout_seconds)
  except errors.ConfigError as e:  # inconsistent --distributed/--coordinator_address flags
    raise errors.UsageError(str(e)) from e
  # Before anything slow: SIGTERM and Ctrl-C are handled from here on.
  with contextlib.closing(preemption.Preemption()) as notice:
    _import_tensorflow_quietly()
    logging.info("JAX %s: %d processes, %d devices (%s).", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.default_backend())
    state, metrics = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, notice)
  return state, metrics, notice


def _user_error(e: BaseException) -> str | None:
  """The message to show for an error the user can fix, else None (a bug: traceback)."""
  if isinstance(e, (errors.UserError, preemption.Preempted, pretrained.WeightsError)):
    return str(e)
  seen = e
  while seen is not None:  # orbax wraps I/O errors of its background writes
    if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or (
        "No space left on device" in str(seen)):
      return workdir.full_text(workdir.resolve(FLAGS.workdir))
    seen = seen.__cause__ or seen.__context__
  return None


def _usage_error(text: str) -> None:
  """A bad command line: one line, exit 2 (run-time failures exit 1)."""
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv: list[str]) -> None:
  """Trains and evaluates; prints the final test accuracy."""
  cli.require_config(FLAGS.config)
  if FLAGS.print_config:
    print(cli.describe_config(FLAGS.config))
    return
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {' '.join(argv[1:])}: flags take the form --name=value "
                 f"(see --help).")
  if FLAGS.workdir is None:
    _usage_error("--workdir is required (a directory for checkpoints and metrics), e.g. "
                 "--workdir=/tmp/run.")
  if not FLAGS["verbosity"].present:
    _quiet()
  try:
    state, metrics, notice = run()
  except (Exception, preemption.Preempted) as e:  # pylint: disable=broad-except
    message = _user_error(e)
    if message is None or FLAGS["verbosity"].present or os.environ.get("DENSENET_JAX_TRACEBACK"):
      raise
    if isinstance(e, preemption.Interrupted):
      preemption.say(message)
      _exit_now(preemption.EXIT_INTERRUPTED)
    preemption.say(f"error: {message}")
    _exit_now(e.exit_code if isinstance(e, preemption.Preempted) else
              2 if isinstance(e, errors.UsageError) else 1)
  if metrics and jax.process_index() == 0:
    print(f"Final test accuracy: {metrics['accuracy']:.4f} "
          f"({int(metrics['examples'])} examples)", flush=True)
  if notice.interrupted:  # a Ctrl-C during the final save or evaluation lets them finish
    preemption.say(preemption.stopped_text(int(checkpointing.host_value(state.step)),
                                           finished=bool(metrics)))
    _exit_now(preemption.EXIT_INTERRUPTED)


def _exit_now(code: int) -> None:
  """Exits without interpreter finalization, where tensorstore's threads can still print
  'Event loop is closed' tracebacks after a failed write (the hooks are gone by then);
  checkpoints and metrics are closed by now, so only the distributed runtime needs a shutdown."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(
      argv, f"{__doc__}\n{default.describe_fields()}"))
