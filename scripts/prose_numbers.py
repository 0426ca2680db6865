"""Check that every number quoted in a chapter's prose is shown by the cells beside it.

A chapter's prose quotes its results ("80% in 100 steps instead of 650"). Those
numbers are typed by hand, so a change to a chapter that moves its outputs can leave
the prose saying something the cells no longer show. This checker reads a notebook and
flags every number in its Markdown cells that is not shown where the prose stands.

The check (the default) has two parts:

* the *strict* check binds each number to the cells next to it (below: where a number
  must be shown, and what counts as shown);
* the *lock* (``book/data/prose-bindings.json``) records, for each number, what the
  strict check bound it to when a writer last accepted it (``--bind``), and flags
  what has changed since: the strict check alone lets a stale number through where
  the section happens to print the stale value too ("0.966" edited to "0.969" beside
  a printed 0.969), the lock does not (below: the lock).

``--strict`` runs the strict check alone. ``--loose`` is the first version: a number
passes if it appears anywhere in the chapter's outputs or code, and ratios in words
are not checked. On the chapters of 6 December 2026, of 49 stale numbers planted in
the prose (``tests/test_prose_numbers.py``, seed 16) the first version flags 23, the
strict check 37 and the lock all 49; of 39 printed values moved under the prose, the
strict check flags 14 and the lock all 39.

Strict mode: where a number must be shown
    The *neighbourhood* of a piece of prose is the outputs of

    * the code cells of its section (not for a number of one significant digit,
      such as 0.1 or 30, which a section prints all over): a Markdown heading of
      level 2 or deeper runs to the next heading of the same or a higher level, and
      the prose belongs to the
      innermost section around it (a cell that holds a heading is split there); an
      ``{exercise}`` block, with its solution, is a section of its own inside
      "Exercises";
    * the nearest code cell above the Markdown cell and the nearest one below it, even
      across a heading;
    * the sections and figures the prose refers to with ``{ref}`` or ``{numref}``
      (a label in the chapter itself, such as ``(ch05-lr)=`` above a heading, or a
      figure's ``name``).

    A number the body's prose quotes where its neighbourhood shows it may be quoted
    again anywhere (the same token: "0.82" again, not "0.8"; not a ratio of 10 or
    less): it is checked where it is bound. The introduction (before the first
    level-2 heading) and the "Summary" restate results from everywhere: they have
    no section of their own, and the Summary not even the code cells beside it (they
    belong to the last section), so a summary bullet that quotes a number the body
    does not quote refers to its section with {ref}.

Strict mode: what counts as shown
    * A printed number, to the precision the prose gives it: prose "0.82" matches a
      printed 0.8214 (the output rounded to the prose's decimals), "82%" or "82
      points" also matches 0.8214, "5,000" matches 5000. The indices of a module's
      repr ("(7): Sigmoid()") are not printed numbers.
    * A number written in the code, only where the prose says it is a setting, and
      only in the code cell just above or below the prose (or a module-level
      UPPER_CASE constant, ``LR, STEPS = 5.0, 400``, a setting of the whole chapter).
      The prose says so right before the number: "rate", "lr", "learning rate",
      "batch (size) (of)", "batches of", "momentum", "weight decay", "decay", "seed",
      "epsilon"/"eps", "width", "threshold", "temperature", "order", or a bound a
      cell asserts ("within", "below", "under", "above", "over", "less than", "more
      than", "at least", "at most"), with an optional "=", "of", "is" or "at"; or
      right after it, with up to two words between: "steps", "epochs", "iterations",
      "examples", "images", "digits", "units", "channels", "features", "seeds",
      "classes", "batches", "values", "updates", "runs", "rounds", "rows", "layers",
      ... ("with lr = 0.1", "batches of 32", "700 steps", "200 random batches"); or
      the number is one of a network's widths ("64-100-100-10"); or its sentence says
      what a cell checks or asserts ("checks that ... within 0.15").
    * The size of the data ("4,000 training digits", "359 test digits") may match an
      output anywhere in the chapter: it is printed once, where the data are loaded.
    * A ratio ("3.5 to 4 times as many", "four times sooner", "a factor of 7",
      "sevenfold", "twice as large", "halves") is checked whatever its size, in digits
      or in words: it is shown by a printed number equal to it at the prose's
      precision (a word is a whole number: "four" is 3.5 <= x < 4.5; "twice",
      "doubles" and "halves" are 2, and "halves" is also a printed 0.5), where a ratio
      of 10 or less must be printed with a decimal point (4.2 or 4.0 shows "4 times";
      a printed count 4 does not); or by the quotient of two numbers (not small whole
      numbers) quoted in the same sentence ("grown sevenfold (row norm 3.99, against
      0.58 at the start)").

Not checked: math (``$...$``), code, roles and links; whole numbers from 0 to 10 that
are not ratios (they mostly count things: "three layers", "Chapter 3"); years
(1900-2030); a number right after "Chapter", "Table", "Figure", "Algorithm",
"Section", "Part", "Eq." and the like.

Numbers from elsewhere (a paper, an arithmetic fact) are listed in the notebook's
metadata under ``bnbook.quoted_numbers``, with where they come from:
``{"50,000": "Ioffe & Szegedy (2015), Sec. 4.1: steps"}``. An entry that the prose no
longer contains is reported too, so the list cannot go stale.

A flag names the number, the cell (index and first words), the cells whose outputs it
was looked for in, and where the chapter does print it, if it does ("0.969 in cell 31
(“The BN network…”): not in the outputs of cells 29-33; nearest printed nearby: 0.966
in cell 30").

The lock: each number's recorded binding
    ``--bind`` runs the strict check on a chapter and, if it flags nothing, records
    under the chapter's key (its file name without ``.ipynb``) one line per number of
    the prose: the Markdown cell's id, the number as written and its occurrence in the
    cell (0 for the first "0.82" of the cell, 1 for a second one), and what shows it
    (``bound``): a token ``printed`` ``by`` a code cell (its id; ``at``: its place
    among the numbers the cell prints, ``of`` them, ``count``: how many of those are
    that token), a ``setting in code`` written by a cell, the ``quoted_numbers
    metadata``, a ``re-quote`` of the number bound ``by`` another Markdown cell, or a
    ``quotient`` of two numbers of its sentence. If the strict check flags anything,
    nothing of that chapter is recorded (exit status 1). Re-binding an unchanged
    chapter leaves the file as it was, byte for byte; it lists what it changed.

    The check then also flags, with the command that accepts it:

    * a number with no recorded binding (new or edited prose): "0.969 in cell 31
      (“The BN network…”) has no recorded binding: it is new or changed; the lock
      records 0.966 here, bound to 0.966 printed by cell 30, which the prose no longer
      has. The strict check binds it to 0.969 printed by cell 33: check it against the
      output it quotes, then run `python scripts/prose_numbers.py --bind
      book/08_convolutional.ipynb`";
    * a binding that no longer holds (a re-run moved the output; a setting changed):
      "0.966 in cell 31 (…) was bound to 0.966 printed by cell 30, which now prints
      0.969 in its place: re-read what the sentence quotes; fix the prose if it no
      longer says what the output shows, then run `... --bind ...`". A printed
      binding holds while the cell prints the token in its place; where the output
      has more or fewer numbers than before, while it prints the token as often;
    * a recorded number that the prose no longer has (so the file cannot rot), and a
      chapter with nothing recorded.

    A number the strict check flags gets that flag only. Cells are found by their
    ids, so inserting or moving cells does not disturb the bindings.

Usage: ``python scripts/prose_numbers.py [--strict | --loose | --bind]
[book/05_faster_convergence.ipynb ...]`` (no notebook: every chapter); exit status 1
if anything is flagged (or, with ``--bind``, left unrecorded).
``tests/test_chapters.py`` runs the check on every chapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
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
# The mode of check_notebook and of the command line: the strict check and the lock
# (--loose gives the first version).
STRICT_BY_DEFAULT = True

# --- strict mode -------------------------------------------------------------------
HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)
SUMMARY_TITLE = re.compile(r"^\W*(?:summary|in summary|takeaways|key points)\b", re.I)
EXERCISE_START = re.compile(r"^(?:`{3,}|:{3,})\{exercise\}", re.M)
LABEL = re.compile(r"^\(([\w-]+)\)=\s*$", re.M)
REFERENCE = re.compile(r"\{(?:ref|numref)\}`(?:[^`<]*<)?([\w-]+)>?`")
SETTING_BEFORE = re.compile(
    r"(?:\b(?:learning[ -]rates?|rates?|lr|batch(?:es)?(?: sizes?)?|mini-batch(?:es)?|"
    r"momentum|weight decay|decay|seeds?|epsilon|eps|width|threshold|temperature|order|"
    r"within)"
    r"\s*(?:=|of|is|at)?\s*)$", re.I)
SETTING_NOUNS = (
    r"steps?|epochs?|iterations?|examples?|images?|digits?|units?|channels?|features?|"
    r"seeds?|classes|batch(?:es)?|batch-mates|values|probabilities|updates|runs|"
    r"repeats|trials|draws|samples|layers|pixels|elements|processes|ranks|orders|rows|"
    r"rounds")
# "700 steps", "4,000 training digits", "200 random batches", "the 60-batch stream"
SETTING_AFTER = re.compile(
    rf"(?:\s+(?:[a-z]+[ -]){{0,2}}|-)(?:{SETTING_NOUNS})\b", re.I)
# "the 359 test digits": the size of the data, printed once where they are loaded
DATA_SIZE = re.compile(
    r"\s+(?:(?:training|test|validation|MNIST|real|probe)\s+)*"
    r"(?:digits|examples|images|samples)\b")
# "64-100-100-10": the widths of a network
ARCHITECTURE = re.compile(r"\d+(?:\s*[-–]\s*\d+){2,}")
# a sentence about what a cell checks: its thresholds are written in the code
CHECK_WORDS = re.compile(r"\b(?:checks?|checked|asserts?|asserted|assertion)\b", re.I)
COMPARATIVE = r"(?:as|the|its|their|apart|more|less|fewer|\w+er)\b"
RATIO_AFTER = re.compile(
    r"(?:\s*[-‐]?\s*fold\b|\s+times\s+" + COMPARATIVE
    + r"|\s*(?:to|–|-)\s*\d+(?:\.\d+)?\s+times\s+" + COMPARATIVE + ")", re.I)
RATIO_BEFORE = re.compile(
    r"\bfactor of\s+(?:about\s+|roughly\s+|nearly\s+|almost\s+|some\s+|only\s+)?$",
    re.I)
WORD_VALUES = {
    "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20,
    "fifty": 50, "hundred": 100, "thousand": 1000,
}
_WORDS = "|".join(WORD_VALUES)
RATIO_WORD = re.compile(
    rf"\b(?:(?P<word>{_WORDS})(?:\s*[-‐]?\s*fold\b|\s+times\s+{COMPARATIVE})"
    r"|factor of\s+(?:about\s+|roughly\s+|nearly\s+|almost\s+|some\s+)?"
    rf"(?P<fword>{_WORDS})\b"
    r"|(?<!both )(?<!two )(?<!the )(?<!its )"  # "both halves" is a noun
    r"(?P<two>twice\s+as|doubles|doubled|halves(?!\s+every)|halved|halve|half\s+as)\b)",
    re.I)  # "halves every 6.6 batches" is a half-life


@dataclass(frozen=True)
class Flag:
    """A number in the prose that nothing in the chapter (strict: beside it) shows."""

    path: str
    cell: int
    number: str
    context: str
    where: str = ""

    def __str__(self) -> str:
        if self.where:
            if not self.context:
                return f"{self.path}: {self.where}"
            return f"{self.path}: {self.where}\n    in “…{self.context}…”"
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


def _number_tokens(text: str) -> list[tuple[str, float]]:
    """(token, value) of each number in code or an output, in the order found."""
    text = text.replace("_", "")
    found = []
    for m in CODE_NUMBER.finditer(text):
        try:
            found.append((m.group(), abs(float(m.group()))))
        except ValueError:
            pass
    # "20,332" printed with a thousands separator is also the number 20332
    found += [(m.group(), float(m.group().replace(",", "")))
              for m in GROUPED_NUMBER.finditer(text)]
    return found


def _numbers(text: str) -> list[float]:
    return [value for _, value in _number_tokens(text)]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _output_text(cell: dict) -> str:
    texts = []
    for out in cell.get("outputs", []):
        texts.append(out.get("text", ""))
        data = out.get("data", {})
        texts += [v for k, v in data.items() if k.startswith("text/")]
    return "\n".join(t if isinstance(t, str) else "".join(t) for t in texts)


def shown_numbers(nb: dict) -> tuple[list[float], list[float]]:
    """(numbers printed in the outputs, numbers written in the code) of a notebook."""
    printed, written = [], []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        written += _numbers(_source(cell))
        printed += _numbers(_output_text(cell))
    return printed, written


def _half_ulp(frac: str) -> float:
    return 0.5 * 10.0 ** -(len(frac) - 1 if frac else 0) + 1e-12


def _check_loose(path: Path, nb: dict) -> list[Flag]:
    """The first version: anywhere in the chapter's outputs or code."""
    quoted = nb.get("metadata", {}).get("bnbook", {}).get(METADATA_KEY, {})
    printed, written = shown_numbers(nb)
    flags, seen = [], set()
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "markdown":
            continue
        text = prose_text(_source(cell))
        for m in PROSE_NUMBER.finditer(text):
            whole, frac = m.group(1), m.group(2) or ""
            token = m.group().lstrip("−-")
            seen.add(token)
            value = float(whole.replace(",", "") + frac)
            if not frac and (value <= 10 or 1900 <= value <= 2030):
                continue
            if NOT_A_QUANTITY_BEFORE.search(text[: m.start()]) or token in quoted:
                continue
            half_ulp = _half_ulp(frac)
            percent = PERCENT_AFTER.match(text, m.end()) is not None
            pool = printed + written
            if any(abs(x - value) <= half_ulp
                   or (percent and abs(100 * x - value) <= half_ulp) for x in pool):
                continue
            context = " ".join(text[max(0, m.start() - 60): m.end() + 25].split())
            flags.append(Flag(str(path), index, token, context))
    flags += _stale_quoted(path, quoted, seen)
    return flags


def _stale_quoted(path: Path, quoted: dict, seen: set[str]) -> list[Flag]:
    why = f"listed in metadata {METADATA_KEY} but not in the prose"
    return [Flag(str(path), -1, token, why,
                 f"{token!r} is {why}: remove it from the notebook's metadata")
            for token in quoted if token not in seen]


# --- strict mode -------------------------------------------------------------------
@dataclass
class Segment:
    """A piece of one Markdown cell's prose, inside one section."""

    cell: int
    text: str  # prose_text of the piece
    section: int  # index into Chapter.sections
    refs: list[str] = field(default_factory=list)


@dataclass
class Section:
    level: int  # 2..6 for headings, 7 for an exercise block, 1 for the introduction
    title: str
    first: int  # first cell
    end: int = 10**9  # the cell that holds the heading closing it (exclusive for code)
    summary: bool = False


@dataclass
class ProseNumber:
    """One number the strict check looks at, with its verdict."""

    cell: int
    token: str  # as written: "0.82", "5,000", "four", "twice"
    value: float
    half_ulp: float
    kind: str  # "number", "ratio" or "word"
    start: int  # offset in the segment's text
    segment: Segment
    shown: bool = False
    # what shows it (strict_numbers fills it in): {"bound": "printed", "by": cell,
    # "token": "0.9661", "at": 3}, {"bound": "setting in code", ...}, ...
    binding: dict | None = None


class Chapter:
    """The cells of a notebook, cut into sections, with the numbers each cell shows."""

    def __init__(self, nb: dict):
        self.cells = nb["cells"]
        self.sections: list[Section] = [Section(1, "introduction", 0)]
        self.segments: list[Segment] = []
        self.labels: dict[str, int] = {}  # label -> section index, or -(cell + 1)
        self.printed: dict[int, list[float]] = {}
        self.written: dict[int, list[float]] = {}
        self.decimals: dict[int, list[float]] = {}  # printed with a decimal point
        self.constants: list[float] = []
        # the same numbers with their tokens, for the recorded bindings
        self.printed_tokens: dict[int, list[tuple[str, float]]] = {}
        self.written_tokens: dict[int, list[tuple[str, float]]] = {}
        self.constant_tokens: list[tuple[int, str, float]] = []
        self.code_cells = [i for i, c in enumerate(self.cells)
                           if c["cell_type"] == "code"]
        for i in self.code_cells:
            cell = self.cells[i]
            # "(7): Sigmoid()" in a module's repr is an index, not a result
            shown = re.sub(r"^\s*\(\d+\):", " ", _output_text(cell), flags=re.M)
            self.printed_tokens[i] = _number_tokens(shown)
            self.printed[i] = [v for _, v in self.printed_tokens[i]]
            self.decimals[i] = [abs(float(m.group())) for m in re.finditer(
                r"(?<![\w.])(?:\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)", shown)]
            source = _source(cell)
            self.written_tokens[i] = _number_tokens(re.sub(r"#.*", " ", source))
            self.written[i] = [v for _, v in self.written_tokens[i]]
            constant = r"^([A-Z][A-Z0-9_]*(?:\s*,\s*[A-Z][A-Z0-9_]*)*)\s*=([^=\n].*)$"
            for m in re.finditer(constant, source, flags=re.M):
                tokens = _number_tokens(re.sub(r"#.*", " ", m.group(2)))
                self.constants += [v for _, v in tokens]
                self.constant_tokens += [(i, t, v) for t, v in tokens]
            figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
            name = figure.get("name")
            if name:
                self.labels[name] = -(i + 1)
            for m in re.finditer(r"#\|\s*(?:label|name):\s*([\w-]+)", source):
                self.labels[m.group(1)] = -(i + 1)
        self._cut()

    def _open(self, level: int, title: str, cell: int) -> int:
        for s in self.sections:  # close every open section at this level or deeper
            if s.end == 10**9 and s.level >= level and s.level > 1:
                s.end = cell
        parent = self.sections[self._current()]
        summary = (bool(SUMMARY_TITLE.match(title))
                   or (parent.level > 1 and parent.summary))
        self.sections.append(Section(level, title, cell, summary=summary))
        return len(self.sections) - 1

    def _current(self) -> int:
        open_ = [k for k, s in enumerate(self.sections) if s.end == 10**9]
        return max(open_, key=lambda k: (self.sections[k].level, k))

    def _cut(self) -> None:
        pending_labels: list[str] = []
        for i, cell in enumerate(self.cells):
            if cell["cell_type"] != "markdown":
                continue
            raw = _source(cell)
            if EXERCISE_START.search(raw):
                self._open(7, "exercise", i)
            refs = REFERENCE.findall(raw)
            text = prose_text(raw)
            pieces = HEADING.split(text)  # [before, hashes, title, after, hashes, ...]
            if pieces[0].strip():
                self.segments.append(Segment(i, pieces[0], self._current(), refs))
            labels_here = LABEL.findall(raw)
            for k in range(1, len(pieces), 3):
                hashes, title, after = pieces[k], pieces[k + 1], pieces[k + 2]
                level = len(hashes)
                if level == 1:
                    continue
                index = self._open(level, title, i)
                for label in pending_labels + labels_here:
                    self.labels.setdefault(label, index)
                pending_labels, labels_here = [], []
                self.segments.append(Segment(i, title + "\n" + after, index, refs))
            pending_labels += labels_here

    def section_cells(self, k: int) -> list[int]:
        s = self.sections[k]
        return [i for i in self.code_cells if s.first < i < s.end]

    def is_restating(self, seg: Segment) -> bool:
        s = self.sections[seg.section]
        return s.level == 1 or s.summary

    def neighbourhood(self, seg: Segment, tight: bool = False,
                      narrow: bool = False) -> list[int]:
        above = [i for i in self.code_cells if i < seg.cell]
        below = [i for i in self.code_cells if i > seg.cell]
        cells = set()
        if not self.sections[seg.section].summary:
            cells.update(above[-1:] + below[:1])
            # the settings of a cell are written in it or next to it (tight)
            if not tight and not narrow and not self.is_restating(seg):
                cells.update(self.section_cells(seg.section))
        for ref in seg.refs:
            target = self.labels.get(ref)
            if target is None:
                continue
            if target < 0:
                cells.add(-target - 1)
            else:
                cells.update(self.section_cells(target))
        return sorted(cells)


def _first_words(cell: dict, n: int = 5) -> str:
    words = prose_text(_source(cell)).replace("#", " ").split()
    return " ".join(words[:n]) + ("…" if len(words) > n else "")


def _ranges(cells: list[int]) -> str:
    if not cells:
        return "none"
    parts, start, prev = [], cells[0], cells[0]
    for c in cells[1:] + [None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(f"{start}" if start == prev else f"{start}–{prev}")
        if c is not None:
            start = prev = c
    return ", ".join(parts)


def _matches(x: float, value: float, half_ulp: float, percent: bool,
             inverse: bool = False) -> bool:
    if abs(x - value) <= half_ulp or (percent and abs(100 * x - value) <= half_ulp):
        return True
    return inverse and abs(x - 1 / value) <= 0.05  # "halves": a printed 0.5


def _fmt(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.3g}"


def _prose_numbers(seg: Segment) -> list[ProseNumber]:
    """The numbers of a segment that the strict check looks at."""
    text, found = seg.text, []
    for m in PROSE_NUMBER.finditer(text):
        whole, frac = m.group(1), m.group(2) or ""
        value = float(whole.replace(",", "") + frac)
        before = text[: m.start()]
        ratio = bool(RATIO_AFTER.match(text, m.end()) or RATIO_BEFORE.search(before))
        if not frac and (1900 <= value <= 2030 or (value <= 10 and not ratio)):
            continue
        if NOT_A_QUANTITY_BEFORE.search(before):
            continue
        kind = "ratio" if ratio else "number"
        found.append(ProseNumber(seg.cell, m.group().lstrip("−-"), value,
                                 _half_ulp(frac), kind, m.start(), seg))
    for m in RATIO_WORD.finditer(text):
        word = m.group("word") or m.group("fword")
        value = float(WORD_VALUES[word.lower()]) if word else 2.0
        start = m.start("word") if m.group("word") else (
            m.start("fword") if word else m.start("two"))
        token = word or m.group("two")
        found.append(
            ProseNumber(seg.cell, token, value, 0.5 + 1e-12, "word", start, seg))
    return found


def _significant(token: str) -> int:
    """Significant digits of a prose number: 3 for 0.822, 1 for 300 or 0.1."""
    digits = token.replace(",", "")
    if not any(c.isdigit() for c in digits):
        return 1
    if "." not in digits:
        digits = digits.rstrip("0") or "0"
    return max(1, len(digits.replace(".", "").lstrip("0")))


def _sentence(text: str, start: int, end: int) -> str:
    """The sentence of text[start:end] (a full stop is one followed by a space)."""
    stops = [m.end() for m in re.finditer(r"[.;!?](?=\s)|\n\s*\n", text[:start])]
    after = re.search(r"[.;!?](?=\s|$)|\n\s*\n", text[end:])
    return text[stops[-1] if stops else 0: end + after.start() if after else len(text)]


def _is_setting(text: str, start: int, end: int) -> bool:
    if SETTING_BEFORE.search(text[max(0, start - 40):start]):
        return True
    if SETTING_AFTER.match(text, end):
        return True
    for m in ARCHITECTURE.finditer(text[max(0, start - 40): end + 40]):
        if m.start() <= start - max(0, start - 40) < m.end():
            return True
    return bool(CHECK_WORDS.search(_sentence(text, start, end)))


DECIMAL_TOKEN = re.compile(r"\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+")


def _printed_by(chapter: Chapter, cells: list[int], hit, decimal: bool) -> dict | None:
    """The first printed token of ``cells`` (in that order) that shows a number."""
    for i in cells:
        for k, (token, value) in enumerate(chapter.printed_tokens[i]):
            if hit([value]) and (not decimal or DECIMAL_TOKEN.fullmatch(token)):
                return {"bound": "printed", "by": i, "token": token, "at": k}
    return None


def _judge(chapter: Chapter, n: ProseNumber, cell_numbers: list[float],
           bound: list[ProseNumber] | None
           ) -> tuple[bool, list[int], str, dict | None]:
    """(shown?, the cells looked in, where the chapter prints it otherwise, binding).

    ``bound``: the numbers of the body's prose that their own neighbourhood shows
    (None on the first pass, which finds them). ``binding``: what shows the number
    (the nearest cell first, the one above on a tie), None if nothing does.
    """
    seg, text = n.segment, n.segment.text
    end = n.start + len(n.token)
    percent = n.kind == "number" and PERCENT_AFTER.match(text, end) is not None
    ratio = n.kind != "number"
    inverse = n.kind == "word" and n.token.lower().startswith(("half", "halv"))
    # a number of one significant digit (0.1, 30) is printed all over a section:
    # only the code cells beside the prose show it
    near = chapter.neighbourhood(
        seg, narrow=n.kind == "number" and _significant(n.token) == 1)
    pool_cells = near

    def hit(xs):
        return any(_matches(x, n.value, n.half_ulp, percent, inverse) for x in xs)

    # a small ratio ("4 times", "four times") is shown by a printed 4.2 or 4.0, not
    # by a printed count such as 4
    small_ratio = ratio and n.value <= 10 and n.half_ulp >= 0.5
    # likewise a number the prose writes with decimals ("6.0", "0.54") is shown by
    # a number printed with a decimal point (or an exponent), not by a count
    decimal = n.kind != "word" and "." in n.token
    use_decimals = small_ratio or decimal or (ratio and n.value <= 10)
    printed = chapter.decimals if use_decimals else chapter.printed

    def nearest_first(cells):
        return sorted(cells, key=lambda i: (abs(i - n.cell), i > n.cell))

    if any(hit(printed[i]) for i in pool_cells):
        order = nearest_first(pool_cells)
        return True, near, "", (_printed_by(chapter, order, hit, use_decimals)
                                or _printed_by(chapter, order, hit, False))
    if n.kind == "number" and _is_setting(text, n.start, end):
        beside = chapter.neighbourhood(seg, tight=True)
        if any(hit(chapter.written[i]) for i in beside) or hit(chapter.constants):
            written = [(i, t, v) for i in nearest_first(beside)
                       for t, v in chapter.written_tokens[i]] + chapter.constant_tokens
            i, token = next((i, t) for i, t, v in written if hit([v]))
            return True, near, "", {"bound": "setting in code", "by": i, "token": token}
        if DATA_SIZE.match(text, end) and any(hit(chapter.printed[i])
                                              for i in chapter.code_cells):
            return True, near, "", _printed_by(
                chapter, nearest_first(chapter.code_cells), hit, False)
    if ratio:
        sentence = _sentence(text, n.start, end)
        values = [(m.group().lstrip("−-"), v) for m in PROSE_NUMBER.finditer(sentence)
                  for v in [float(m.group(1).replace(",", "") + (m.group(2) or ""))]
                  if (m.group(2) or v > 10) and m.group() != n.token]
        qs = [(f"{ta} / {tb}", a / b) for ta, a in values for tb, b in values
              if 0 < b < a]
        if hit([q for _, q in qs]):
            token = next(t for t, q in qs if hit([q]))
            return True, near, "", {"bound": "quotient", "token": token}
    if bound is not None and not small_ratio:
        again = [b for b in bound if b.kind == n.kind and b.token == n.token
                 and b is not n]
        if again:  # quoted again: checked where it is bound
            return True, near, "", {"bound": "re-quote", "by": again[0].cell}
    if bound is None:
        return False, pool_cells, "", None
    # not shown: say where the chapter does print it, or what is printed nearby
    elsewhere = [i for i in chapter.code_cells if hit(chapter.printed[i])]
    if elsewhere:
        hint = (f"it is printed in cell {_ranges(elsewhere[:3])}, outside this "
                "section: refer to it with {ref}/{numref}, move the sentence, or "
                "print it here")
        return False, pool_cells, hint, None
    best, best_cell = None, None
    for i in pool_cells:
        for x in chapter.printed[i]:
            if x <= 0:
                continue
            scale = 100 if percent and x <= 1 else 1
            d = abs(math.log(scale * x / n.value)) if n.value > 0 else abs(x)
            if best is None or d < best[0]:
                best, best_cell = (d, x), i
    hint = (f"nearest printed nearby: {_fmt(best[1])} in cell {best_cell}"
            if best else "nothing is printed nearby")
    if n.kind == "number" and any(hit(chapter.written[i]) for i in near):
        hint += "; it is written in the code nearby: if it is a setting, say so"
    return False, pool_cells, hint, None


def _cell_values(chapter: Chapter) -> dict[int, list[float]]:
    per_cell: dict[int, list[float]] = {}
    for seg in chapter.segments:
        for m in PROSE_NUMBER.finditer(seg.text):
            per_cell.setdefault(seg.cell, []).append(
                float(m.group(1).replace(",", "") + (m.group(2) or "")))
    return per_cell


def strict_numbers(nb: dict) -> list[tuple[ProseNumber, bool, str, str]]:
    """Every number the strict check looks at: (number, shown?, scope, hint).

    A number quoted from a paper (metadata) is shown, with scope "metadata". What
    shows a number is in its ``binding``.
    """
    return _strict(nb)[1]


def _strict(nb: dict) -> tuple[Chapter, list[tuple[ProseNumber, bool, str, str]]]:
    chapter = Chapter(nb)
    quoted = nb.get("metadata", {}).get("bnbook", {}).get(METADATA_KEY, {})
    per_cell = _cell_values(chapter)
    numbers = [n for seg in chapter.segments for n in _prose_numbers(seg)]
    bound = [n for n in numbers if not chapter.is_restating(n.segment)
             and n.token not in quoted
             and _judge(chapter, n, per_cell.get(n.cell, []), None)[0]]
    result = []
    for n in numbers:
        if n.token in quoted:
            n.shown, n.binding = True, {"bound": "quoted_numbers metadata"}
            result.append((n, True, "metadata", ""))
            continue
        shown, looked, hint, n.binding = _judge(
            chapter, n, per_cell.get(n.cell, []), bound)
        n.shown = shown
        scope = (f"the outputs of cells {_ranges(looked)}" if looked else
                 "a section it refers to with {ref}, nor quoted in the body")
        result.append((n, shown, scope, hint))
    return chapter, result


def _check_strict(path: Path, nb: dict, results: list | None = None) -> list[Flag]:
    quoted = nb.get("metadata", {}).get("bnbook", {}).get(METADATA_KEY, {})
    flags, seen = [], set()
    cells = nb["cells"]
    for n, shown, scope, hint in strict_numbers(nb) if results is None else results:
        seen.add(n.token)
        if shown:
            continue
        text = n.segment.text
        context = " ".join(
            text[max(0, n.start - 60): n.start + len(n.token) + 25].split())
        what = "ratio " if n.kind != "number" else ""
        where = (f"{what}{n.token} in cell {n.cell} (“{_first_words(cells[n.cell])}”): "
                 f"not in {scope}; {hint}")
        flags.append(Flag(str(path), n.cell, n.token, context, where))
    for cell in cells:  # a quoted number may sit where the strict check does not look
        if cell["cell_type"] == "markdown":
            seen.update(m.group().lstrip("−-")
                        for m in PROSE_NUMBER.finditer(prose_text(_source(cell))))
    flags += _stale_quoted(path, quoted, seen)
    return flags


# --- the lock: the recorded binding of each prose number -----------------------------
LOCK = Path("data") / "prose-bindings.json"  # beside the chapters: book/data/...
CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "book")
                  .glob("[0-9][0-9]_*.ipynb"))


def lock_file(path: str | Path) -> Path:
    """The file that records a chapter's bindings: ``data/prose-bindings.json``."""
    return Path(path).parent / LOCK


def _load(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}


def _dump(data: dict) -> str:
    """One chapter per key, sorted; one prose number per line, in the prose's order."""
    parts = []
    for key in sorted(data):
        lines = ",\n".join("  " + json.dumps(e, sort_keys=True, ensure_ascii=False)
                           for e in data[key])
        parts.append(f" {json.dumps(key)}: [\n{lines}\n ]" if lines
                     else f" {json.dumps(key)}: []")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _cell_id(cell: dict, index: int) -> str:
    return cell.get("id") or f"index-{index}"  # nbformat >= 4.5 gives every cell an id


def _keyed(results: list) -> list[tuple[tuple[int, str, int], ProseNumber, bool]]:
    """((cell, token, occurrence of the token in the cell), number, shown?)."""
    seen: Counter = Counter()
    keyed = []
    for n, shown, _, _ in results:
        keyed.append(((n.cell, n.token, seen[n.cell, n.token]), n, shown))
        seen[n.cell, n.token] += 1
    return keyed


def _entry(chapter: Chapter, ids: list[str], n: ProseNumber, occurrence: int) -> dict:
    b = n.binding or {"bound": "shown"}
    entry = {"cell": ids[n.cell], "number": n.token, "occurrence": occurrence,
             "bound": b["bound"]}
    if "by" in b:
        entry["by"] = ids[b["by"]]
    if "token" in b:
        entry["token"] = b["token"]
    if b["bound"] == "printed":
        tokens = [t for t, _ in chapter.printed_tokens[b["by"]]]
        # its place among the numbers the cell prints, how many those are, and how
        # often the token is one of them
        entry["at"], entry["of"] = b["at"], len(tokens)
        entry["count"] = tokens.count(b["token"])
    return entry


def bindings(nb: dict) -> list[dict]:
    """What shows each number of the prose, as ``--bind`` records it."""
    chapter, results = _strict(nb)
    ids = [_cell_id(c, i) for i, c in enumerate(nb["cells"])]
    return [_entry(chapter, ids, n, key[2]) for key, n, shown in _keyed(results)
            if shown]


def _describe(entry: dict, index: dict[str, int]) -> str:
    """What a binding binds to: "0.966 printed by cell 30"."""
    kind, by = entry["bound"], entry.get("by")
    cell = (f"cell {index[by]}" if by in index
            else f"a cell (id {by}) that is no longer in the chapter")
    if kind == "printed":
        return f"{entry['token']} printed by {cell}"
    if kind == "setting in code":
        return f"the setting {entry['token']} written in {cell}"
    if kind == "re-quote":
        return f"the same number quoted in {cell}, where it is bound"
    if kind == "quotient":
        return f"the quotient {entry['token']} of two numbers in its sentence"
    if kind == "quoted_numbers metadata":
        return f"a source listed in the metadata bnbook.{METADATA_KEY}"
    return kind


def _broken(entry: dict, chapter: Chapter, index: dict[str, int], quoted: dict,
            prose_tokens: dict[int, set[str]], cell: int) -> str | None:
    """Why a recorded binding no longer holds, None if it holds."""
    kind, by = entry["bound"], index.get(entry.get("by", ""))
    if "by" in entry and by is None:
        return ""  # _describe says the cell is gone
    if kind == "printed":
        if chapter.cells[by]["cell_type"] != "code":
            return "which is no longer a code cell"
        tokens = [t for t, _ in chapter.printed_tokens[by]]
        at, token = entry["at"], entry["token"]
        if at < len(tokens) and tokens[at] == token:
            return None  # the same token in its place
        if len(tokens) != entry["of"] and tokens.count(token) == entry["count"]:
            return None  # the output has more or fewer numbers: the token as often
        if not tokens:
            return "which now prints no number (is the chapter executed?)"
        if at < len(tokens):
            return f"which now prints {tokens[at]} in its place"
        return f"which now prints {len(tokens)} numbers, none of them {token}"
    if kind == "setting in code":
        if chapter.cells[by]["cell_type"] == "code" and entry["token"] in [
                t for t, _ in chapter.written_tokens[by]]:
            return None
        return "whose code no longer writes it"
    if kind == "re-quote":
        return None if entry["number"] in prose_tokens.get(by, set()) else (
            "which no longer quotes it")
    if kind == "quotient":
        a, _, b = entry["token"].partition(" / ")
        return None if {a, b} <= prose_tokens.get(cell, set()) else (
            "which the sentence no longer quotes")
    if kind == "quoted_numbers metadata":
        return None if entry["number"] in quoted else "which no longer lists it"
    return None


def _key(entry: dict) -> tuple[str, str, int]:
    return entry["cell"], entry["number"], entry["occurrence"]


def _nth(k: int) -> str:
    """How a message names the k-th occurrence of a number in a cell ("the 2nd ")."""
    return "the " + {1: "2nd ", 2: "3rd "}.get(k, f"{k + 1}th ") if k else ""


def _check_lock(path: Path, nb: dict, chapter: Chapter, results: list,
                recorded: list[dict] | None, file: Path) -> list[Flag]:
    """A number with no recorded binding, a binding that no longer holds, and a
    recorded number that the prose no longer has."""
    cells = nb["cells"]
    ids = [_cell_id(c, i) for i, c in enumerate(cells)]
    index = {cell_id: i for i, cell_id in enumerate(ids)}
    rebind = f"`python scripts/prose_numbers.py --bind {path}`"
    if recorded is None:
        return [Flag(str(path), -1, "", "", (
            f"no binding of its {len(results)} prose numbers is recorded in {file}: "
            f"run {rebind}, which lists what each number is bound to, and check the "
            "list"))]
    quoted = nb.get("metadata", {}).get("bnbook", {}).get(METADATA_KEY, {})
    prose_tokens: dict[int, set[str]] = {}
    for n, _, _, _ in results:
        prose_tokens.setdefault(n.cell, set()).add(n.token)
    for seg in chapter.segments:
        prose_tokens.setdefault(seg.cell, set()).update(
            m.group().lstrip("−-") for m in PROSE_NUMBER.finditer(seg.text))
    keyed = _keyed(results)
    now = {(ids[cell], token, k) for (cell, token, k), _, _ in keyed}
    stale = [e for e in recorded if _key(e) not in now]
    by_key = {_key(e): e for e in recorded}

    def context(n: ProseNumber) -> str:
        text = n.segment.text
        return " ".join(text[max(0, n.start - 60): n.start + len(n.token) + 25].split())

    def where(cell: int) -> str:
        return f"cell {cell} (“{_first_words(cells[cell])}”)"

    flags, explained = [], set()
    for (cell, token, k), n, shown in keyed:
        if not shown:
            continue  # the strict check flags it
        entry = by_key.get((ids[cell], token, k))
        if entry is None:
            gone = [e for e in stale if e["cell"] == ids[cell]]
            explained.update(id(e) for e in gone)
            replaced = ("; the lock records " + ", ".join(
                f"{e['number']} here, bound to {_describe(e, index)}" for e in gone)
                + ", which the prose no longer has") if gone else ""
            found = _describe(_entry(chapter, ids, n, k), index)
            flags.append(Flag(str(path), cell, token, context(n), (
                f"{_nth(k)}{token} in {where(cell)} has no recorded binding: it is "
                f"new or changed{replaced}. The strict check binds it to {found}: "
                f"check it against the output it quotes, then run {rebind}")))
            continue
        why = _broken(entry, chapter, index, quoted, prose_tokens, cell)
        if why is None:
            continue
        flags.append(Flag(str(path), cell, token, context(n), (
            f"{_nth(k)}{token} in {where(cell)} was bound to "
            f"{_describe(entry, index)}{', ' + why if why else ''}: re-read what the "
            "sentence quotes; fix the prose if it no longer says what the output "
            f"shows, then run {rebind}")))
    for e in stale:
        if id(e) in explained:
            continue
        cell = index.get(e["cell"], -1)
        place = (where(cell) if cell >= 0 else
                 f"a Markdown cell (id {e['cell']}) that is no longer in the chapter")
        flags.append(Flag(str(path), cell, e["number"], "", (
            f"the lock records {_nth(e['occurrence'])}{e['number']} in {place}, "
            f"bound to {_describe(e, index)}, but the prose there no longer has it: if "
            f"it was removed or changed on purpose, run {rebind}")))
    return flags


def check_notebook(path: str | Path, strict: bool | None = None,
                   lock: str | Path | bool | None = None) -> list[Flag]:
    """The flags of one notebook; ``strict=None``: as ``STRICT_BY_DEFAULT`` says.

    ``lock``: in strict mode, the file of recorded bindings to check the chapter
    against (None: ``lock_file(path)``; False: none, the strict check alone).
    """
    path = Path(path)
    strict = STRICT_BY_DEFAULT if strict is None else strict
    nb = json.loads(path.read_text(encoding="utf-8"))
    if not strict:
        return _check_loose(path, nb)
    chapter, results = _strict(nb)
    flags = _check_strict(path, nb, results)
    if lock is False:
        return flags
    file = lock_file(path) if lock is None or lock is True else Path(lock)
    return flags + _check_lock(path, nb, chapter, results,
                               _load(file).get(path.stem), file)


def bind(paths: list[str | Path], lock: str | Path | None = None) -> int:
    """Record the bindings of each chapter that passes the strict check (its key only).

    A chapter the strict check flags is not recorded: its flags are printed and the
    status is 1.
    """
    status = 0
    for path in map(Path, paths):
        file = lock_file(path) if lock is None else Path(lock)
        nb = json.loads(path.read_text(encoding="utf-8"))
        chapter, results = _strict(nb)
        flags = _check_strict(path, nb, results)
        if flags:
            for f in flags:
                print(f)
            print(f"{path}: NOT recorded: {len(flags)} number(s) in its prose that no "
                  "cell beside them shows; fix them first (--bind records only numbers "
                  "the strict check shows)", file=sys.stderr)
            status = 1
            continue
        data = _load(file)
        old = {_key(e): e for e in data.get(path.stem, [])}
        ids = [_cell_id(c, i) for i, c in enumerate(nb["cells"])]
        index = {cell_id: i for i, cell_id in enumerate(ids)}
        new = [_entry(chapter, ids, n, key[2]) for key, n, shown in _keyed(results)]
        changes = []
        for e in new:
            key = _key(e)
            place = f"{_nth(e['occurrence'])}{e['number']} in cell {index[e['cell']]}"
            if key not in old:
                changes.append(f"  + {place}: {_describe(e, index)}")
            elif old[key] != e:
                changes.append(f"  ~ {place}: {_describe(old[key], index)} -> "
                               f"{_describe(e, index)}")
        keys = {_key(e) for e in new}
        changes += [f"  - {_nth(k[2])}{k[1]} in cell {index.get(k[0], k[0])}: dropped"
                    for k in old if k not in keys]
        data[path.stem] = new
        text = _dump(data)
        if not file.exists() or file.read_text(encoding="utf-8") != text:
            file.parent.mkdir(parents=True, exist_ok=True)
            part = file.with_name(f".{file.name}.{os.getpid()}")
            part.write_text(text, encoding="utf-8")
            os.replace(part, file)  # a reader never sees half a file
        print(f"{path}: {len(new)} prose numbers bound, {len(changes)} change(s), "
              f"recorded in {file}")
        for line in changes:
            print(line)
    return status


def main(argv: list[str]) -> int:
    options = {"--strict", "--loose", "--bind"}
    paths = [a for a in argv if a not in options] or [
        os.path.relpath(p) for p in CHAPTERS]
    if any(p.startswith("-") for p in paths):
        print(__doc__.split("Usage:")[-1].strip(), file=sys.stderr)
        return 2
    if "--bind" in argv:
        return bind(paths)
    strict = "--strict" in argv or (STRICT_BY_DEFAULT and "--loose" not in argv)
    lock = None if strict and "--strict" not in argv else False
    flags = [f for p in paths for f in check_notebook(p, strict=strict, lock=lock)]
    for f in flags:
        print(f)
    if not strict:
        note = " (--strict: the check bound to the cells beside each number)"
    elif lock is False:
        note = " beside them (the recorded bindings not checked)"
    else:
        note = (" beside them, or whose recorded binding no longer holds; once the "
                "prose says what the outputs show, --bind records it")
    print(f"{len(flags)} number(s) in the prose that no cell shows{note}",
          file=sys.stderr)
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
