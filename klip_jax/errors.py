"""User-facing errors.

Every problem caused by user input (a config, a data directory, a record, a path) raises a
`KlipError` subclass whose message says what is wrong and how to fix it. The CLI prints such
errors without a traceback and exits with status 2, and so does an OSError (a path that cannot
be read or written: a read-only folder, a full disk, a file where a folder belongs); anything
else is a bug and keeps its traceback.
"""


class KlipError(Exception):
  """Base class of all errors a user can fix."""


class ConfigError(KlipError):
  """A configuration value is missing, of the wrong type or out of range."""


class RecordError(KlipError):
  """A data record does not follow the schema (names the field and the problem)."""


class DatasetError(KlipError):
  """A dataset directory is missing, incomplete, or was built with other settings."""


class TokenizerError(KlipError):
  """A tokenizer cannot be trained or loaded."""


class CheckpointError(KlipError):
  """A checkpoint cannot be restored: damaged, or written for another config."""


class ExportError(KlipError):
  """A checkpoint cannot be exported or imported (missing files or optional dependencies)."""


class FitError(KlipError):
  """A sweep table cannot be read or determines no scaling law (says which term and why)."""


class Preempted(Exception):
  """Training stopped early on a preemption notice (SIGTERM), after checkpointing: not an
  error (the CLI exits 0); running the same command again continues exactly."""

  def __init__(self, step: int):
    super().__init__(f"preempted: stopped and checkpointed at step {step}; run the same command "
                     "again to continue")
    self.step = step
