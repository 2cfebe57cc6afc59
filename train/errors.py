"""Errors the user can act on: `train.main` prints their message alone and exits non-zero."""


class UserError(Exception):
  """A condition the user can fix (config, data, workdir, disk); the message names the fix."""


class UsageError(UserError):
  """The command line is wrong (flags, arguments): `train.main` exits 2, not 1."""


class ConfigError(UserError, ValueError):
  """A config field has a value the trainer cannot run with."""


class DatasetError(UserError):
  """The dataset's files are missing, damaged or do not match its metadata."""


class WorkdirError(UserError):
  """The workdir cannot be used: held by another run, unwritable, or needs a decision."""


class CheckpointError(UserError):
  """No checkpoint in the workdir can be used by this run."""


class IncompatibleCheckpointError(CheckpointError):
  """The workdir's checkpoints belong to a differently configured run (nothing was moved)."""


DIVERGENCE_FIX = ("Lower --config.learning_rate, add --config.warmup_epochs, or check the input "
                  "normalisation, then rerun.")


class DivergedError(UserError, FloatingPointError):
  """Training produced non-finite values; the newest finite checkpoint is kept."""


class DiskFullError(UserError, OSError):
  """The disk holding the workdir ran out of space."""
