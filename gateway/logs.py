"""structlog setup: the composition root builds one logger and injects it.

`make_logger` has no global effect. The two process-wide hooks are separate and explicit, for the
composition root to call once at start-up: `route_stdlib_logging` (the root logger's handler, so what
aiohttp, asyncio and asyncssh log through stdlib `logging` becomes one JSON line like ours) and
`quiet_libraries` (their levels). `loop_exception_handler` builds a handler for
`loop.set_exception_handler`; installing it is the caller's job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from collections.abc import Callable
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


def _renderer(out: TextIO, fmt: str) -> Any:
    """JSON off a TTY (or with fmt="json"), key=value on one (or with fmt="console")."""
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    return structlog.processors.JSONRenderer(sort_keys=False) if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)


def make_logger(stream: TextIO | None = None, fmt: str = "auto", level: int = logging.INFO, **context: Any) -> FilteringBoundLogger:
    """JSON lines off a TTY, readable key=value lines on one. `context` is bound to every line."""
    out = stream if stream is not None else sys.stderr
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _renderer(out, fmt),
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


class _StdlibLineHandler(logging.StreamHandler[TextIO]):
    """One line per record, flushed; a record that cannot be formatted still gives one line, not a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        _, exc, _ = sys.exc_info()
        line = {"event": "log_record_failed", "level": "error", "logger": record.name, "error": f"{type(exc).__name__}: {exc}"}
        try:
            self.stream.write(json.dumps(line, default=str) + self.terminator)
            self.flush()
        except (OSError, ValueError):
            pass


def route_stdlib_logging(stream: TextIO | None = None, fmt: str = "auto", level: int = logging.INFO) -> logging.Handler:
    """Make every stdlib `logging` record one line in make_logger's format, with `logger` and `level` fields.

    Installs one handler on the root logger (replacing one an earlier call installed; other handlers
    are left alone) and sets the root level to `level`. A record's traceback goes into the
    `exception` field, and its stack into `stack_info`, so with fmt="json" a record is exactly one
    line. `stream` defaults to sys.stderr at call time; `fmt` is "auto", "json" or "console", as for
    make_logger. Returns the handler so the caller (or a test) can remove it. Process-wide: call once,
    from the composition root.
    """
    out = stream if stream is not None else sys.stderr
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(out, fmt),
        ],
    )
    handler = _StdlibLineHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibLineHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


LoopExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]


def loop_exception_handler(log: FilteringBoundLogger) -> LoopExceptionHandler:
    """A handler for `loop.set_exception_handler` that logs one `loop_exception` line.

    The line has asyncio's `message`, and when there is an exception its `exception_type`, its text
    (`error`) and the innermost frame (`where`, "file:line in function"); no traceback, so it stays
    one line. From a Task it adds the task's name. Never the handle's or future's repr: those show
    callback arguments, which may hold secrets. The handler does not raise.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        fields: dict[str, Any] = {"message": str(context.get("message", ""))}
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            fields["exception_type"] = type(exc).__name__
            fields["error"] = str(exc)
            frames = traceback.extract_tb(exc.__traceback__)
            if frames:
                last = frames[-1]
                fields["where"] = f"{last.filename}:{last.lineno} in {last.name}"
        task = context.get("task", context.get("future"))
        if isinstance(task, asyncio.Task):
            fields["task"] = task.get_name()
        log.error("loop_exception", **fields)

    return handle
