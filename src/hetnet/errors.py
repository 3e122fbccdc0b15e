"""Errors meant for people: the command line turns these into one line on stderr and exit status 2.

Raise `UsageError` for a bad flag or argument, `DataError` for a bad data file, `ModelFileError` for a bad model or
checkpoint file. Each message names the file or flag, what was expected and what was found.
"""


class HetnetError(Exception):
    """Base class: an error caused by the user's input, not a bug."""


class UsageError(HetnetError, ValueError):
    """A bad command-line flag, argument or option value."""


class DataError(HetnetError, ValueError):
    """A data set file or folder that is missing, truncated, corrupt or inconsistent."""


class ModelFileError(HetnetError, ValueError):
    """A model, spec or checkpoint file that is missing, corrupt or not hetnet's."""


class DeviceError(HetnetError, RuntimeError):
    """An unknown device string, a missing CUDA stack, or the device running out of memory."""


class TrainingDiverged(HetnetError, RuntimeError):
    """The loss became NaN or infinite."""
