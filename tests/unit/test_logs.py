"""Logs: what libraries log through stdlib `logging`, and what the event loop reports, stay one JSON line each."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.logs import loop_exception_handler, make_logger, route_stdlib_logging

Route = Callable[..., logging.Handler]


@pytest.fixture
def route() -> Iterator[Route]:
    """route_stdlib_logging, with every handler it installs removed and the root level put back afterwards.

    Only our handlers are removed: pytest adds and removes its own capture handlers around each test
    phase, so restoring a saved copy of root.handlers would put stale ones back.
    """
    root = logging.getLogger()
    level = root.level
    installed: list[logging.Handler] = []

    def install(stream: io.StringIO, fmt: str = "auto", level: int = logging.INFO) -> logging.Handler:
        handler = route_stdlib_logging(stream, fmt=fmt, level=level)
        installed.append(handler)
        return handler

    yield install
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _raise(exc: BaseException) -> None:
    raise exc


def test_stdlib_exception_is_one_json_line_with_its_traceback(route: Route) -> None:
    """aiohttp's "Error handling request" with a traceback becomes one JSON line; the traceback is a field."""
    stream = io.StringIO()
    route(stream, fmt="json")
    try:
        _raise(ValueError("boom"))
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    lines = _lines(stream)
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "Error handling request"
    assert record["logger"] == "aiohttp.server" and record["level"] == "error"
    assert record["exception"].startswith("Traceback (most recent call last):")
    assert "in _raise" in record["exception"] and "ValueError: boom" in record["exception"]
    assert "timestamp" in record


def test_stdlib_arguments_are_formatted_into_the_event(route: Route) -> None:
    """A %-style message is formatted, and the record's level is kept."""
    stream = io.StringIO()
    route(stream, fmt="json")
    logging.getLogger("asyncssh").warning("Connection lost from %s", "192.0.2.7")
    record = json.loads(stream.getvalue())
    assert record["event"] == "Connection lost from 192.0.2.7"
    assert record["level"] == "warning" and record["logger"] == "asyncssh"


def test_multi_line_message_stays_one_line(route: Route) -> None:
    """asyncio's "Task exception was never retrieved\\nfuture: ..." message is escaped, not split."""
    stream = io.StringIO()
    route(stream, fmt="json")
    logging.getLogger("asyncio").error("Task exception was never retrieved\nfuture: <Task finished>")
    (line,) = _lines(stream)
    assert json.loads(line)["event"] == "Task exception was never retrieved\nfuture: <Task finished>"


def test_records_below_the_level_are_dropped(route: Route) -> None:
    """With level=WARNING an INFO record writes nothing."""
    stream = io.StringIO()
    route(stream, fmt="json", level=logging.WARNING)
    logging.getLogger("aiohttp.server").info("hello")
    assert stream.getvalue() == ""


def test_calling_twice_installs_one_handler(route: Route) -> None:
    """A second call replaces the first handler, so a record is still written once."""
    first, second = io.StringIO(), io.StringIO()
    old = route(first, fmt="json")
    new = route(second, fmt="json")
    logging.getLogger("x").error("once")
    assert first.getvalue() == "" and len(_lines(second)) == 1
    assert new in logging.getLogger().handlers and old not in logging.getLogger().handlers


def test_unformattable_record_gives_one_line_not_a_traceback(route: Route, capsys: pytest.CaptureFixture[str]) -> None:
    """A record whose arguments do not fit its message is reported as one log_record_failed line."""
    stream = io.StringIO()
    ours = route(stream, fmt="json")
    root = logging.getLogger()
    others = [h for h in root.handlers if h is not ours]
    for h in others:  # pytest's capture handler fails the test on a bad record by design; this test wants ours alone
        root.removeHandler(h)
    try:
        logging.getLogger("lib").error("%d items", "not a number")
    finally:
        for h in others:
            root.addHandler(h)
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["event"] == "log_record_failed" and record["logger"] == "lib" and "TypeError" in record["error"]
    assert capsys.readouterr().err == ""


def test_console_format_renders_the_exception(route: Route) -> None:
    """With fmt="console" the record and its traceback are written readably, without crashing."""
    stream = io.StringIO()
    route(stream, fmt="console")
    try:
        _raise(RuntimeError("kaput"))
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    text = stream.getvalue()
    assert "Error handling request" in text and "aiohttp.server" in text and "RuntimeError: kaput" in text


def test_auto_format_off_a_tty_is_json(route: Route) -> None:
    """fmt="auto" on a stream that is not a terminal gives JSON, as make_logger does."""
    stream = io.StringIO()
    route(stream)
    logging.getLogger("x").error("plain")
    assert json.loads(stream.getvalue())["event"] == "plain"


async def test_loop_exception_handler_logs_one_line_for_a_lost_task_exception() -> None:
    """A task whose exception nobody retrieved is reported by the loop as one loop_exception JSON line."""
    stream = io.StringIO()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler(make_logger(stream, fmt="json")))
    try:

        async def fail() -> None:
            _raise(KeyError("vm"))

        task = asyncio.create_task(fail(), name="relay-web01")
        await asyncio.wait([task])
        del task
        gc.collect()  # the Task's finaliser is what reports the lost exception
    finally:
        loop.set_exception_handler(None)
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["event"] == "loop_exception" and record["level"] == "error"
    assert record["message"] == "Task exception was never retrieved"
    assert record["exception_type"] == "KeyError" and record["error"] == "'vm'"
    assert record["task"] == "relay-web01" and " in _raise" in record["where"]
    assert "exception" not in record


async def test_loop_exception_handler_without_exception_keeps_only_safe_fields() -> None:
    """A context without an exception logs its message; other context objects are not repr'd into the line."""
    stream = io.StringIO()
    handle = loop_exception_handler(make_logger(stream, fmt="json"))
    context: dict[str, Any] = {"message": "Unclosed client session", "client_session": object(), "handle": "secret-arg"}
    handle(asyncio.get_running_loop(), context)
    (line,) = _lines(stream)
    record = json.loads(line)
    assert record["event"] == "loop_exception" and record["message"] == "Unclosed client session"
    assert "secret-arg" not in line and "object at" not in line
