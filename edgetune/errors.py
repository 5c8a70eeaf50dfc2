"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class EdgetuneError(Exception):
    """Base class for user-facing errors (bad input, missing file, damaged bundle)."""


class DataError(EdgetuneError):
    """A dataset file or line is malformed; the message names file, line and field."""


class ModelError(EdgetuneError):
    """A model directory is missing, partial, corrupt or of an unsupported architecture."""


class BundleError(EdgetuneError):
    """A bundle is missing, damaged or does not match its manifest."""


class ConfigError(EdgetuneError):
    """A config file or flag value is invalid."""


class OutputExistsError(EdgetuneError):
    """The output path exists and the command was not told to replace it."""
