"""The cluster's two heartbeat documents, read back: a node's liveness key and its rows (one JSON line a session)."""

from __future__ import annotations

import asyncio
import json

from gateway.sessions.cluster import _alive_doc, _parse_rows, _rows_doc_now, _rows_head


def rows_doc(node: str, rows: list[object]) -> str:
    head = json.dumps({"node": node, "at": "2026-12-02T06:00:00Z", "sessions": len(rows)}, separators=(",", ":"))
    return "\n".join([head, *(json.dumps(r, separators=(",", ":")) for r in rows)])


def test_a_row_with_newlines_in_its_text_stays_one_line() -> None:
    rows = [{"id": "a", "client_name": "two\nlines\r\n"}, {"id": "b", "user": "é\u2028x"}]
    doc = rows_doc("n1", rows)
    assert doc.count("\n") == 2
    assert _rows_doc_now(doc, 100) == ("2026-12-02T06:00:00Z", rows)
    assert asyncio.run(_parse_rows(doc.split("\n")[1:])) == rows


def test_rows_are_bounded_and_bad_lines_skipped() -> None:
    doc = rows_doc("n1", [{"id": str(i)} for i in range(600)]) + "\nnot json\n[1, 2]\n"
    assert [r["id"] for r in _rows_doc_now(doc, 3)[1]] == ["0", "1", "2"]  # type: ignore[index]
    split = _rows_head(doc, 10_000)
    assert split is not None and split[:2] == ("n1", "2026-12-02T06:00:00Z")
    assert len(asyncio.run(_parse_rows(split[2]))) == 600
    assert _rows_doc_now(doc, 0) == ("2026-12-02T06:00:00Z", [])


def test_what_is_not_a_rows_document_is_none() -> None:
    for raw in (None, b"x", "", "not json", '{"node": "n"}', "[]", '"text"', 42):
        assert _rows_doc_now(raw, 10) is None
        assert _rows_head(raw, 10) is None


def test_liveness_keys_are_read_strictly() -> None:
    good = json.dumps({"node": "n1", "at": "2026-12-02T06:00:00Z", "sessions": 3})
    assert _alive_doc(good) == ("n1", "2026-12-02T06:00:00Z", 3)
    for bad in (
        None,
        "nope",
        json.dumps({"node": "n1", "at": "t"}),
        json.dumps({"node": "n1", "at": "t", "sessions": -1}),
        json.dumps({"node": "n1", "at": "t", "sessions": True}),
        json.dumps({"node": "n1", "at": "t", "sessions": "3"}),
        json.dumps({"node": "n1", "at": "t", "sessions": 1, "pad": "x" * 5000}),
    ):
        assert _alive_doc(bad) is None, bad
