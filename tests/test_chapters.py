"""Claims that survive an instructor's edit.

Re-running a chapter after a change (``make execute``) updates its outputs but not its
prose: every number in a chapter's prose must be shown by the cells beside it, and by
the output recorded for it in ``book/data/prose-bindings.json``
(``scripts/prose_numbers.py``; ``--bind`` records the bindings). And a claim asserted
in a cell must say which claim broke when it fails: every ``assert`` in a chapter
carries a message.
"""

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import prose_numbers  # noqa: E402

CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_number_in_the_prose_is_shown_by_the_chapter(path):
    # the default check: each number bound to the outputs of the cells beside it
    # (strict), and to the output its recorded binding names (the lock)
    flags = prose_numbers.check_notebook(path)
    assert not flags, (
        f"{len(flags)} number(s) in the prose of {path.name} that no cell beside "
        "them shows, or whose recorded output changed; re-read the outputs and fix "
        "the prose (a number quoted from a paper goes under metadata "
        "bnbook.quoted_numbers with its source), then record the bindings with "
        f"`python scripts/prose_numbers.py --bind book/{path.name}`:\n"
        + "\n".join(str(f) for f in flags))


def _asserts_without_message(path):
    """(cell index, source line) of each assert with no message in a notebook's code."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    bare = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                         for line in lines)
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Assert) and node.msg is None:
                bare.append((index, lines[node.lineno - 1].strip()))
    return bare


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_every_assert_in_a_chapter_names_the_claim_it_checks(path):
    bare = _asserts_without_message(path)
    assert not bare, (
        f"{len(bare)} assert(s) in {path.name} with no message; when one fails, the "
        "message is all a reader sees of which claim broke:\n"
        + "\n".join(f"  cell {i}: {line}" for i, line in bare))


def _notebook(cells, quoted=None):
    meta = {"bnbook": {"quoted_numbers": quoted}} if quoted else {}
    return {"metadata": meta, "cells": cells}


def _md(text):
    return {"cell_type": "markdown", "source": text}


def _code(source, printed=""):
    outputs = [{"output_type": "stream", "name": "stdout", "text": printed}]
    return {"cell_type": "code", "source": source,
            "outputs": outputs if printed else []}


@pytest.mark.parametrize("prose, flagged", [
    ("It reaches 80% in 100 steps instead of 650.", []),
    ("It reaches 80% in 100 steps instead of 700.", ["700"]),   # the output moved
    ("The accuracy is 0.82 after training.", []),                # rounded from 0.8214
    ("The accuracy is 0.83 after training.", ["0.83"]),
    ("A rate of 0.1 for 120 steps.", []),                        # written in the code
    ("A rate of 0.2.", ["0.2"]),
    ("See Chapter 12 and Table 2 of the paper; in 2018, three layers.", []),
    ("The mean is $\\mu = 123.4$ and `x[999]`.", []),  # math and code are not prose
    ("```{exercise}\n:label: ex1\nRun it for 4,321 steps.\n```", ["4,321"]),
])
def test_the_checker_flags_exactly_the_numbers_no_cell_shows(tmp_path, prose, flagged):

    nb = _notebook([_code("fit(lr=0.1, steps=120, threshold=0.8)",
                          "steps to 80%: 100 vs 650\naccuracy 0.8214"), _md(prose)])
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    for strict in (False, True):  # the first version and the strict one agree here
        found = prose_numbers.check_notebook(path, strict=strict, lock=False)
        assert [f.number for f in found] == flagged


def test_numbers_quoted_from_papers_are_listed_with_their_sources(tmp_path):
    """... and the list cannot go stale."""

    path = tmp_path / "nb.ipynb"
    quoted = {"50,000": "Ioffe & Szegedy (2015), Sec. 4.1"}
    prose = _md("The paper trains for 50,000 steps.")
    path.write_text(json.dumps(_notebook([prose], quoted)))
    assert prose_numbers.check_notebook(path, lock=False) == []
    path.write_text(json.dumps(_notebook([_md("The paper trains for long.")], quoted)))
    [flag] = prose_numbers.check_notebook(path, lock=False)
    assert flag.number == "50,000" and "not in the prose" in flag.context
