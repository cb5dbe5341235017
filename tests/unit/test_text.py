"""gateway.text.one_line: what reaches a user's terminal from an operator's words."""

from __future__ import annotations

import pytest

from gateway.text import one_line


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("maintenance at 18:00", "maintenance at 18:00"),
        ("  two\tlines\nhere  ", "two lines here"),
        ("\x1b[2J\x1b[31mred\x1b[0m", "[2J[31mred[0m"),  # ESC goes; the rest is harmless text
        ("C1 \x9b31m csi", "C1 31m csi"),
        ("admin\u202eevil", "adminevil"),  # a bidi override would make the line read backwards
        ("zero\u200bwidth", "zerowidth"),
        ("bell\x07 and del\x7f", "bell and del"),
        ("café 日本 ✓", "café 日本 ✓"),
        ("\x1b\x1b", ""),
    ],
)
def test_one_line_keeps_text_and_drops_controls(raw: str, shown: str) -> None:
    """Printable text (any script) is kept; controls, format characters and line breaks are not."""
    assert one_line(raw) == shown
