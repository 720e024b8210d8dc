"""Text from the guest, made safe to print: data, never terminal control or markup.

Executable paths, command lines, PHP function names, DNS names, socket listings, stderr and
console tails all come from a guest whose root may be hostile. On a terminal, an ESC or CSI
sequence in them would move the cursor, rewrite earlier lines (a blocked attempt shown as
allowed), set the window title or worse; bidirectional overrides would reorder what is read;
and rich would take `[bold]` or `x[/]` as markup (the latter raises). So every such string is
printed as a rich.text.Text (never parsed as markup) whose control characters are replaced by
visible escapes. rich strips only a few control codes itself (BEL, BS, VT, FF, CR), not ESC.
"""

from __future__ import annotations

import unicodedata

from rich.text import Text

# Invisible characters that change how the text around them reads: bidirectional embeddings,
# overrides and isolates, and the directional marks.
_BIDI = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clean(value: object, *, multiline: bool = False) -> str:
    """`value` as text with every control character (C0, DEL, C1, bidi controls, other format
    characters) shown as a \\xNN / \\uNNNN escape; newlines kept only with `multiline`. Pure."""
    text = str(value)
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\n" and multiline:
            out.append(char)
        elif (
            code < 0x20
            or 0x7F <= code <= 0x9F
            or code in _BIDI
            or (unicodedata.category(char) in ("Cf", "Cs", "Co", "Cn") and not char.isprintable())
        ):
            out.append(_escape_char(char))
        else:
            out.append(char)
    return "".join(out)


def text(value: object, *, style: str = "", multiline: bool = False) -> Text:
    """A rich Text of `value`, escaped by clean(), never read as markup."""
    return Text(clean(value, multiline=multiline), style=style)


def labeled(label: str, style: str, value: object, *, multiline: bool = True) -> Text:
    """`label value` with the label styled, e.g. labeled("warning:", "yellow", message)."""
    return Text.assemble((label, style), " ", text(value, multiline=multiline))
