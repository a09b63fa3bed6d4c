"""The errors dite raises for bad input.

A leaf module (imports nothing of ours) so that models, schedulers and the engine can all
raise the same types. Every message names the problem and what to do about it; the CLI
prints it as one line and exits non-zero.
"""


class DiteError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class CheckpointError(DiteError, ValueError):
    """A checkpoint file or folder cannot be read or does not fit the model."""


class ConfigError(DiteError, ValueError):
    """A configuration (model, scheduler, pipeline) is missing, unknown or inconsistent."""


class InputError(DiteError, ValueError):
    """An argument of a generation call is out of range or of the wrong kind."""


class HubError(DiteError, OSError):
    """A hub repository could not be downloaded (offline, private, missing)."""


class NonFiniteError(DiteError, ValueError):
    """A NaN or infinite value: in a weight file, in given latents, or produced while sampling."""
