"""Text that reaches a user's terminal or a log from what someone typed: one line, no control characters.

An operator's reason or notice is written into users' terminals, so ESC sequences, C1 controls and
bidirectional overrides (which can make a line read differently from what it says) are removed, and
whitespace runs fold to one space.
"""

from __future__ import annotations

import unicodedata

# Unicode categories dropped: Cc (C0 and C1 controls, ESC, DEL), Cf (format: bidi overrides and isolates,
# zero-width joiners), Co (private use), Cs (surrogates), Cn (unassigned).
_DROP = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})


def one_line(text: str) -> str:
    """`text` as one printable line: whitespace runs become one space, control and format characters go."""
    words = ("".join(ch for ch in w if unicodedata.category(ch) not in _DROP) for w in text.split())
    # A word made only of dropped characters (a lone zero-width space, an ESC) leaves no double space behind.
    return " ".join(w for w in words if w)
