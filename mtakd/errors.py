"""User-facing errors: the exception classes the CLI prints as a message (exit 2) instead of a traceback.

A leaf: it imports nothing from mtakd, so every module (the config, the registries, the models) can raise them.
The classes are also importable from where they are raised: ``mtakd.config.ConfigError``,
``mtakd.data.DataError``, ``mtakd.models.ModelError``, ``mtakd.spans.SpanError``.
"""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is meant for the user."""


class DataError(ValueError):
    """Unusable input data; the message names the file and line."""


class ModelError(RuntimeError):
    """A model that cannot be used; the message is meant for the user."""


class SpanError(RuntimeError):
    """A user-facing problem with span extraction (missing spaCy model, unusable doc, ...)."""


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss stopped training (training.on_nonfinite=stop); the message names the step and component."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelError, SpanError, FileExistsError, NonFiniteLossError,
)
