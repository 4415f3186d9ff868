"""Exceptions that carry a one-line, user-facing explanation.

Library code raises these for bad *input* (a file that is not a checkpoint, a raster with the wrong band count …).
The CLI prints ``str(error)`` on one line and exits with status 2 instead of showing a traceback.
"""


class EODinoError(Exception):
    """Base class of all user-facing errors of eo_dinov3."""


class CheckpointError(EODinoError, ValueError):
    """A checkpoint file cannot be read or does not fit the requested architecture."""


class DataError(EODinoError, ValueError):
    """Input data (raster, tile, manifest, benchmark file) is unusable; the message says why."""


class ConfigError(EODinoError, ValueError):
    """A configuration value is invalid."""
