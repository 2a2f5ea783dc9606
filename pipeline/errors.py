"""The errors a user can fix. The command line prints their message, not a traceback, and exits 2.

Kept free of heavy imports so that a bad parameter is reported without loading torch.
"""


class PipelineError(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(PipelineError, ValueError):
    """params.yaml (or an override) does not describe a valid run."""


class DataError(PipelineError, RuntimeError):
    """The data could not be fetched or read."""


class ModelFileError(PipelineError, RuntimeError):
    """A saved model is missing or does not match the params."""
