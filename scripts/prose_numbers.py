"""Check that every number quoted in a chapter's prose comes from the chapter itself.

A chapter's prose quotes its results ("80% in 100 steps instead of 650"). Those
numbers are typed by hand, so a change to a chapter that moves its outputs can leave
the prose saying something the cells no longer show. This checker reads a notebook and
flags every number in its Markdown cells that is not

* printed in an output of one of its code cells, or written in one of them (a batch
  size, a learning rate), to the precision the prose gives it: prose "0.82" matches a
  printed 0.8214; "82%" or "82 points" also matches 0.8214; or
* listed in the notebook's metadata under ``bnbook.quoted_numbers``, with where it
  comes from (a paper, an arithmetic fact): ``{"50,000": "Ioffe & Szegedy (2015), Sec.
  4.1: steps"}``.

Not checked: math (``$...$``), code, roles and links; whole numbers from 0 to 10 (they
mostly count things: "three layers", "Chapter 3"); years (1900-2030); a number right
after "Chapter", "Table", "Figure", "Algorithm", "Section", "Part", "Eq." and the
like.

An entry of ``quoted_numbers`` that the prose no longer contains is reported too, so
the list cannot go stale.

Usage: ``python scripts/prose_numbers.py book/05_faster_convergence.ipynb [...]``;
exit status 1 if anything is flagged. ``tests/test_chapters.py`` runs it on every
chapter.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# A number as prose writes it: 700, 50,000, 0.822, −0.012 (the sign is ignored).
PROSE_NUMBER = re.compile(r"(?<![\w.\-−])[−-]?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
# A number as code or an output writes it: 0.822, 1e-05, 50_000, 3.
CODE_NUMBER = re.compile(r"(?<![\w.])(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
GROUPED_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\d,])")
NOT_A_QUANTITY_BEFORE = re.compile(
    r"(?:Chapters?|Chs?\.|Tables?|Figures?|Figs?\.|Algorithms?|Sections?|Secs?\.|§|Parts?|"
    r"Eqs?\.|Equations?|Appendix|Theorem|Lemma|Proposition|Corollary|Definition|pp?\.|"
    r"Exercises?|exercises?|[Ss]tep [0-9]+ (?:and|to|or)|[Ss]teps? [0-9]+[–-])\s*$"
)
PERCENT_AFTER = re.compile(
    r"\s*(?:%|percent|percentage points|points|\s*[–-]\s*\d+(?:\.\d+)?\s*%)")
PROSE_DIRECTIVES = {
    "exercise", "solution", "note", "tip", "warning", "important", "caution",
    "attention", "hint", "seealso", "admonition", "margin", "sidebar", "epigraph",
    "topic", "dropdown",
}
METADATA_KEY = "quoted_numbers"


@dataclass(frozen=True)
class Flag:
    """A number in the prose that nothing in the chapter shows."""

    path: str
    cell: int
    number: str
    context: str

    def __str__(self) -> str:
        return (f"{self.path}, Markdown cell {self.cell}: {self.number!r} "
                f"in “…{self.context}…”")


def _strip_fences(md: str) -> str:
    """Drop fenced code and math; keep the prose in exercise, note, ... directives."""

    def fence(m: re.Match) -> str:
        info, body = m.group(2).strip(), m.group(3)
        directive = re.fullmatch(r"\{([\w:-]+)\}.*", info)
        if directive and directive.group(1).split(":")[-1] in PROSE_DIRECTIVES:
            return "\n" + re.sub(r"^:[\w-]+:.*$", " ", body, flags=re.M) + "\n"
        return " "

    previous = None
    fences = re.compile(r"^(`{3,}|~{3,}|:{3,})(.*?)\n(.*?)^\1\s*$", flags=re.S | re.M)
    while previous != md:  # directives nest: strip the outer fences until none are left
        previous = md
        md = fences.sub(fence, md)
    return md


def prose_text(markdown: str) -> str:
    """The Markdown of a cell with everything that is not running prose blanked out."""
    md = _strip_fences(markdown)
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"(?<!\\)\$[^$]*?(?<!\\)\$", " ", md, flags=re.S)
    md = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", md)  # roles: {cite:t}`...`, {ref}`...`
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"^\([\w-]+\)=\s*$", " ", md, flags=re.M)  # labels
    md = re.sub(r"\]\([^)]*\)", "]", md)  # link targets
    md = re.sub(r"<!--.*?-->", " ", md, flags=re.S)
    md = re.sub(r"<[^>]+>", " ", md)
    return re.sub(r"https?://\S+", " ", md)


def _numbers(text: str) -> list[float]:
    text = text.replace("_", "")
    found = []
    for m in CODE_NUMBER.finditer(text):
        try:
            found.append(abs(float(m.group())))
        except ValueError:
            pass
    # "20,332" printed with a thousands separator is also the number 20332
    found += [float(m.group().replace(",", "")) for m in GROUPED_NUMBER.finditer(text)]
    return found


def shown_numbers(nb: dict) -> tuple[list[float], list[float]]:
    """(numbers printed in the outputs, numbers written in the code) of a notebook."""
    printed, written = [], []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        written += _numbers("".join(cell["source"]))
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")]
            data = out.get("data", {})
            texts += [v for k, v in data.items() if k.startswith("text/")]
            for t in texts:
                printed += _numbers("".join(t))
    return printed, written


def check_notebook(path: str | Path) -> list[Flag]:
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    quoted = nb.get("metadata", {}).get("bnbook", {}).get(METADATA_KEY, {})
    printed, written = shown_numbers(nb)
    flags, seen = [], set()
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = prose_text("".join(cell["source"]))
        for m in PROSE_NUMBER.finditer(text):
            whole, frac = m.group(1), m.group(2) or ""
            token = m.group().lstrip("−-")
            seen.add(token)
            value = float(whole.replace(",", "") + frac)
            if not frac and (value <= 10 or 1900 <= value <= 2030):
                continue
            if NOT_A_QUANTITY_BEFORE.search(text[: m.start()]) or token in quoted:
                continue
            half_ulp = 0.5 * 10.0 ** -(len(frac) - 1 if frac else 0) + 1e-12
            percent = PERCENT_AFTER.match(text, m.end()) is not None
            pool = printed + written
            if any(abs(x - value) <= half_ulp
                   or (percent and abs(100 * x - value) <= half_ulp) for x in pool):
                continue
            context = " ".join(text[max(0, m.start() - 60): m.end() + 25].split())
            flags.append(Flag(str(path), index, token, context))
    for token in quoted:
        if token not in seen:
            why = f"listed in metadata {METADATA_KEY} but not in the prose"
            flags.append(Flag(str(path), -1, token, why))
    return flags


def main(paths: list[str]) -> int:
    flags = [f for p in paths for f in check_notebook(p)]
    for f in flags:
        print(f)
    print(f"{len(flags)} number(s) in the prose that no cell shows", file=sys.stderr)
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
