"""Sphinx extension: read bnlib's plain-text docstrings as reST, for the API reference.

bnlib's docstrings are written to be read in a terminal (``help()``), in a reST-ish
plain text with two habits that reST reads differently:

- shapes such as ``(N, C, *spatial)`` outside double backquotes: reST takes ``*spatial``
  for the start of emphasis (a warning). The star is escaped.
- a formula or command block, indented under the paragraph that introduces it: reST
  makes it a block quote (or a definition list), loses its line breaks and alignment,
  and warns on continuation lines indented further ("Unexpected indentation"). It
  becomes a literal block, shown as written: a paragraph ending in one colon gets a
  second one (``::``, shown as one colon), any other a ``::`` line of its own (which
  reST drops). A list that starts right under a line ending in a colon gets the blank
  line that reST needs to see a list.

Only docstrings of bnlib's own objects are touched, and text in double backquotes never.
Docstrings already written in reST (``::``, blank lines, backquoted shapes) pass through
unchanged.
"""

from __future__ import annotations

import re

_LITERAL = re.compile(r"(``.+?``)")
_SHAPE_STAR = re.compile(r"(?<=[(,] )\*(?=[A-Za-z_]\w*\))|(?<=\()\*(?=[A-Za-z_]\w*\))")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _escape_shapes(line: str) -> str:
    parts = _LITERAL.split(line)
    return "".join(p if i % 2 else _SHAPE_STAR.sub(r"\\*", p)
                   for i, p in enumerate(parts))


def _content_indent(line: str) -> int:
    """Where a line's text starts: after the bullet of a list item."""
    return _indent(line) + (2 if line.lstrip().startswith(("- ", "* ")) else 0)


def convert(lines: list[str]) -> list[str]:
    """The docstring ``lines`` with the plain-text habits above turned into reST."""
    out: list[str] = []
    literal_indent: int | None = None  # inside a literal block: the indent of its "::"
    prev = ""  # the last non-blank line outside literal blocks
    for i, line in enumerate(lines):
        if literal_indent is not None:
            if line.strip() and _indent(line) <= literal_indent:
                literal_indent = None
                if out and out[-1].strip():
                    out.append("")  # reST ends a literal block at a blank line
            else:
                out.append(line)
                continue
        stripped = line.rstrip()
        if (stripped and prev and i and not lines[i - 1].strip()
                and _indent(line) > _content_indent(prev)):
            # An indented block after a blank line: "::" alone starts a literal block.
            literal_indent = _indent(prev)
            out += [" " * literal_indent + "::", "", line]
            continue
        if stripped:
            prev = line
        if stripped.endswith(":") and not stripped.endswith("::") and stripped.strip():
            rest = [ln for ln in lines[i + 1:] if ln.strip()]
            if rest and _indent(rest[0]) > _content_indent(line):
                # An indented block under "...:": a formula display, as written.
                out.append(_escape_shapes(stripped) + ":")
                if lines[i + 1].strip():
                    out.append("")  # reST starts a literal block after a blank line
                literal_indent = _indent(line)
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if nxt.lstrip().startswith("- ") and _indent(nxt) == _indent(line):
                out += [_escape_shapes(line), ""]
                continue
        if stripped.endswith("::"):
            literal_indent = _indent(line)
        out.append(_escape_shapes(line))
    return out


def _process(app, what, name, obj, options, lines) -> None:
    if name == "bnlib" or name.startswith("bnlib."):
        lines[:] = convert(lines)


def setup(app):
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
