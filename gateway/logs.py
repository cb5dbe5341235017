"""structlog setup without global state: the composition root builds one logger and injects it."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger


class _LineWriter:
    """A structlog logger that writes one line and flushes, so a crash loses nothing."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            self._stream.write(message + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass

    info = debug = warning = warn = error = critical = exception = fatal = log = msg


def make_logger(stream: TextIO | None = None, fmt: str = "auto", level: int = logging.INFO, **context: Any) -> FilteringBoundLogger:
    """JSON lines off a TTY, readable key=value lines on one. `context` is bound to every line."""
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    logger: FilteringBoundLogger = structlog.wrap_logger(
        _LineWriter(out),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )
    return logger.bind(**context) if context else logger


def quiet_libraries() -> None:
    """asyncssh logs every channel at INFO through stdlib logging; keep only its warnings."""
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
