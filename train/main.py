"""Trains and evaluates a DenseNet.

    python -m train.main --config configs/cifar_bc.py --workdir /tmp/run [--config.FIELD=VALUE ...]
    python -m train.main --config configs/cifar_bc.py --print_config   # every field, explained

Exit codes: 0 done (or checkpointed after SIGTERM); 2 usage error (a bad flag, a missing config
file); 1 a run-time failure the user can fix (config, data, workdir, disk, checkpoints: one
message naming the fix; --verbosity=1 or DENSENET_JAX_TRACEBACK=1 adds the traceback); 130 after
Ctrl-C (the first checkpoints the step reached, a second stops at once); 143 after a SIGTERM
during start-up.
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

from densenet_jax import pretrained
from train import checkpointing, cli, distributed, errors, preemption, train

FLAGS = flags.FLAGS
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
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
  if "tensorflow" in sys.modules:
    return
  with cli.stderr_to(os.devnull), contextlib.suppress(ImportError):
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import


def describe_config(config) -> str:
  """Every field of `config`, its value and its one-line meaning (configs/default.py HELP)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  lines = []
  flat = {}

  def walk(prefix, node):
    for key in node.keys():
      value = node[key]
      if hasattr(value, "keys") and key != "model_overrides":
        walk(f"{prefix}{key}.", value)
      else:
        flat[prefix + key] = value.to_dict() if hasattr(value, "to_dict") else value

  walk("", config)
  for key, value in flat.items():
    lines.append(f"{f'{key} = {value!r}':<44}  # {default.HELP.get(key, '')}".rstrip(" #"))
  return "\n".join(lines)


class _HideOrbaxTracebacks(stdlib_logging.Filter):
  """Drops orbax's logged tracebacks of failed background writes: the error reaches `main`."""

  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    return not (record.levelno >= stdlib_logging.ERROR and "/orbax/" in record.pathname)


class _HideSigtermWordingAfterCtrlC(stdlib_logging.Filter):
  """After a Ctrl-C, drops the trainer's SIGTERM-worded stop line: `main` prints the Ctrl-C one."""

  def __init__(self, notice: preemption.Preemption):
    super().__init__()
    self.notice = notice

  def filter(self, record: stdlib_logging.LogRecord) -> bool:
    return not (self.notice.interrupted and str(record.msg).startswith("Preempted: checkpointed"))


def _is_closed_loop_noise(exc: BaseException | None) -> bool:
  """Whether `exc` is the 'Event loop is closed' error tensorstore's callbacks raise once orbax
  has torn its loop down after a failed background write (the write's own error reaches
  `main`)."""
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _hide_closed_loop_noise() -> None:
  """Drops that noise from both places Python reports it: sys.excepthook, and
  sys.unraisablehook, where tensorstore's C++ threads send it (PyErr_WriteUnraisable, no
  object: a bare traceback). Everything else prints as usual."""
  def excepthook(exc_type, exc, tb) -> None:
    if not _is_closed_loop_noise(exc):
      sys.__excepthook__(exc_type, exc, tb)

  def unraisablehook(unraisable) -> None:
    if not _is_closed_loop_noise(unraisable.exc_value):
      sys.__unraisablehook__(unraisable)

  sys.excepthook = excepthook
  sys.unraisablehook = unraisablehook


def run(argv: list[str]) -> tuple[train.TrainState, dict[str, float]]:
  """Joins the distributed runtime if needed, then trains and evaluates."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=2)
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.get_absl_handler().addFilter(_HideOrbaxTracebacks())
    _hide_closed_loop_noise()
  if FLAGS.workdir is None:
    raise errors.ConfigError("--workdir is required (a directory for checkpoints and metrics), "
                             "e.g. --workdir=/tmp/run.")
  try:
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, FLAGS.heartbeat_timeout_seconds,
                           FLAGS.initialization_timeout_seconds)
  except errors.ConfigError as e:  # inconsistent --distributed/--coordinator_address flags
    raise errors.UsageError(str(e)) from e
  # Before anything slow: SIGTERM and Ctrl-C are handled from here on.
  notice = preemption.Preemption()
  hide = _HideSigtermWordingAfterCtrlC(notice)
  logging.get_absl_handler().addFilter(hide)
  try:
    _import_tensorflow_quietly()
    logging.info("JAX %s: %d processes, %d devices (%s).", jax.__version__,
                 jax.process_count(), jax.device_count(), jax.default_backend())
    return train.train_and_evaluate(FLAGS.config, FLAGS.workdir, notice)
  finally:
    notice.close()
    _last_notice[0] = notice
    logging.get_absl_handler().removeFilter(hide)


_last_notice: list[preemption.Preemption | None] = [None]  # how `run` was stopped, for `main`


def _user_error(e: BaseException) -> str | None:
  """The message to show for an error the user can fix, else None (a bug: traceback)."""
  if isinstance(e, (errors.UserError, preemption.Preempted, pretrained.WeightsError)):
    return str(e)
  seen = e
  while seen is not None:  # orbax wraps I/O errors of its background writes
    if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or (
        "No space left on device" in str(seen)):
      return (f"The disk holding --workdir={FLAGS.workdir} is full. Free space (or choose "
              f"another --workdir) and rerun the same command: it resumes from the newest "
              f"complete checkpoint.")
    seen = seen.__cause__ or seen.__context__
  return None


def _usage_error(text: str) -> None:
  """A bad command line: one line, exit 2 (run-time failures exit 1)."""
  print(f"error: {text}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv: list[str]) -> None:
  """Trains and evaluates; prints the final test accuracy."""
  if FLAGS.config is None:
    _usage_error("--config is required, e.g. --config configs/cifar_bc.py.")
  if FLAGS.print_config:
    print(describe_config(FLAGS.config))
    return
  if len(argv) > 1:
    _usage_error(f"unexpected arguments {' '.join(argv[1:])}: flags take the form --name=value "
                 f"(see --help).")
  if FLAGS.workdir is None:
    _usage_error("--workdir is required (a directory for checkpoints and metrics), e.g. "
                 "--workdir=/tmp/run.")
  try:
    state, metrics = run(argv)
  except (Exception, preemption.Preempted) as e:  # pylint: disable=broad-except
    message = _user_error(e)
    if message is None or FLAGS["verbosity"].present or os.environ.get("DENSENET_JAX_TRACEBACK"):
      raise
    if isinstance(e, preemption.Interrupted):
      preemption.say(message)
      _exit_now(preemption.EXIT_INTERRUPTED)
    preemption.say(f"error: {message}")
    _exit_now(preemption.EXIT_PREEMPTED if isinstance(e, preemption.Preempted) else
              2 if isinstance(e, errors.UsageError) else 1)
  if metrics and jax.process_index() == 0:
    print(f"Final test accuracy: {metrics['accuracy']:.4f} "
          f"({int(metrics['examples'])} examples)", flush=True)
  notice = _last_notice[0]
  if not metrics and notice is not None and notice.interrupted:
    preemption.say(preemption.stopped_text(int(checkpointing.host_value(state.step))))
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
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, __doc__, configs_dir=CONFIGS))
