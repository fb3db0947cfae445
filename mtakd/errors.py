"""User-facing errors: the CLI prints their message and exits 2 instead of a traceback."""

from .config import ConfigError
from .data import DataError
from .models import ModelError


def _span_error():
    from .spans import SpanError

    return SpanError


class NonFiniteLossError(FloatingPointError):
    """A NaN/inf loss stopped training (training.on_nonfinite=stop); the message names the step and component."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelError, _span_error(), FileExistsError, NonFiniteLossError,
)
