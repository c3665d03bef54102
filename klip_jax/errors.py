"""User-facing errors.

Every problem caused by user input (a config, a data directory, a record, a path) raises a
`KlipError` subclass whose message says what is wrong and how to fix it. The CLI prints such
errors without a traceback and exits with status 2; anything else is a bug and keeps its
traceback.
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


class ExportError(KlipError):
  """A checkpoint cannot be exported or imported (missing files or optional dependencies)."""
