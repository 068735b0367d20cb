"""The problems a user can fix: bad data, a bad checkpoint, a bad config value.

launch.py reports these in one line without a traceback; any other exception (a bug,
or a library failing inside) keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave; the message names it and how to fix it."""


class DataError(UserError):
    """A data folder or file that cannot be used; the message names it and the problem."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message says which and why."""


class ConfigError(UserError):
    """A config value the run cannot use; the message names the field."""


class TrainingDivergedError(UserError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""
