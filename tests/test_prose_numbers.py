"""The prose-number check (``scripts/prose_numbers.py``): strict binding and the lock.

Two parts: an evaluation on the real chapters, and one small synthetic notebook per
rule of the check.

The evaluation plants stale numbers in copies of the chapters, chosen by a fixed seed,
and checks each copy against the lock (the recorded bindings) built from the
unmodified chapters:

* prose plants: a number of the prose changed (its last digit; a ratio's "4" made
  "7"; a number word), the outputs left alone: what a writer's slip leaves;
* output plants: a printed value that a prose number is bound to changed so that it
  no longer rounds to the prose's number, the prose left alone: what a re-run that
  moves the outputs leaves.

Issue 16 asks that 9 in 10 be flagged (CATCH_GOAL), for each kind. The strict check
alone (no lock) is measured too, for comparison: its misses are collisions, a stale
value that the section also prints. ``evaluate(tmp, seed, lock, outputs)`` reports
what was caught and missed.
"""

from __future__ import annotations

import copy
import json
import random
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import prose_numbers as pn  # noqa: E402

CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
SEED = 16
NUMBER_PLANTS_PER_CHAPTER = 3
RATIO_PLANTS = 10  # ratios in digits or in words, over all chapters
OUTPUT_PLANTS_PER_CHAPTER = 3
CATCH_GOAL = 0.9

# --- the evaluation: stale numbers planted in copies of the chapters ----------------


def _occurrences(raw: str, token: str) -> list[re.Match]:
    flags = re.I if token.isalpha() or " " in token else 0
    pattern = rf"(?<![\w.,−-]){re.escape(token)}(?![\w]|[.,]\d)"
    return list(re.finditer(pattern, raw, flags))


def _mutate(token: str, kind: str, rng: random.Random) -> str | None:
    """A stale version of a prose number: what a re-run would leave behind."""
    if kind == "word":
        word = token.lower()
        if word not in pn.WORD_VALUES:
            return None  # "twice", "halves": no single word to change to
        value = pn.WORD_VALUES[word]
        others = [w for w, v in pn.WORD_VALUES.items()
                  if 2 <= v <= 12 and abs(v - value) >= 2]
        new = rng.choice(others)
        return new.capitalize() if token[0].isupper() else new
    digits = [i for i, c in enumerate(token) if c.isdigit()]
    if not digits:
        return None
    i = digits[-1]
    old = token[i]
    if kind == "ratio" and len(digits) == 1:  # "4 times" -> "7 times"
        choices = [d for d in "23456789" if abs(int(d) - int(old)) >= 2]
    else:  # the last digit changed, as a re-run moves it
        choices = [d for d in "0123456789" if d != old]
    if len(digits) == 1 and token[i] != "0":
        choices = [d for d in choices if d != "0" or kind != "ratio"]
    return token[:i] + rng.choice(choices) + token[i + 1:]


def _candidates(nb: dict) -> list[tuple[pn.ProseNumber, int]]:
    """Numbers the strict check finds shown today, each once in its cell's source."""
    found = []
    for n, shown, scope, _ in pn.strict_numbers(nb):
        if not shown or scope == "metadata":
            continue
        raw = pn._source(nb["cells"][n.cell])
        if len(_occurrences(raw, n.token)) == 1:
            found.append((n, n.cell))
    return found


def plants(seed: int = SEED) -> list[tuple[Path, int, str, str, dict]]:
    """(chapter, cell, old token, new token, planted notebook), chosen by ``seed``."""
    rng = random.Random(seed)
    chosen, ratios = [], []
    for path in CHAPTERS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cands = _candidates(nb)
        numbers = [c for c in cands if c[0].kind == "number"]
        k = min(NUMBER_PLANTS_PER_CHAPTER, len(numbers))
        for n, cell in rng.sample(numbers, k):
            chosen.append((path, nb, n, cell))
        ratios += [(path, nb, n, cell) for n, cell in cands
                   if n.kind != "number" and _mutate(n.token, n.kind, random.Random(0))]
    chosen += rng.sample(ratios, min(RATIO_PLANTS, len(ratios)))
    result = []
    for path, nb, n, cell in chosen:
        new = _mutate(n.token, n.kind, rng)
        planted = copy.deepcopy(nb)
        raw = pn._source(planted["cells"][cell])
        [m] = _occurrences(raw, n.token)
        planted["cells"][cell]["source"] = raw[: m.start()] + new + raw[m.end():]
        result.append((path, cell, n.token, new, planted))
    return result


def _stale_output(n: pn.ProseNumber, token: str, rng: random.Random) -> str | None:
    """``token`` printed again with one digit moved, so that it no longer shows ``n``:
    the rightmost digit whose change does that (the smallest such move of a re-run)."""
    end = n.start + len(n.token)
    percent = n.kind == "number" and pn.PERCENT_AFTER.match(n.segment.text, end)
    inverse = n.kind == "word" and n.token.lower().startswith(("half", "halv"))
    mantissa = re.match(r"[\d.,]+", token).group()
    for i in reversed([i for i, c in enumerate(mantissa) if c.isdigit()]):
        choices = []
        for d in "0123456789":
            new = token[:i] + d + token[i + 1:]
            if d == token[i] or (i == 0 and d == "0" and len(mantissa) > 1
                                 and mantissa[1].isdigit()):
                continue
            value = float(new.replace(",", ""))
            if not pn._matches(value, n.value, n.half_ulp, bool(percent), inverse):
                choices.append(new)
        if choices:
            return rng.choice(choices)
    return None


def _replace_printed(cell: dict, at: int, old: str, new: str) -> bool:
    """Print ``new`` in place of the ``at``-th number of a cell's output (``old``)."""
    before = pn.Chapter({"cells": [cell]}).printed_tokens[0]
    fields = []  # (container, key) of each text of the outputs, in the checker's order
    for out in cell.get("outputs", []):
        if "text" in out:
            fields.append((out, "text"))
        fields += [(out["data"], k) for k in out.get("data", {})
                   if k.startswith("text/")]
    for container, key in fields:
        text = container[key] if isinstance(container[key], str) else "".join(
            container[key])
        for m in re.finditer(rf"(?<![\w.]){re.escape(old)}(?![\w.]?\d)", text):
            container[key] = text[: m.start()] + new + text[m.end():]
            after = pn.Chapter({"cells": [cell]}).printed_tokens[0]
            if [t for t, _ in after] == [new if k == at else t
                                         for k, (t, _) in enumerate(before)]:
                return True
            container[key] = text
    return False


def output_plants(seed: int = SEED) -> list[tuple[Path, int, str, str, dict]]:
    """(chapter, Markdown cell, prose number, "code cell: old -> new", planted
    notebook): a printed value a prose number is bound to, moved; chosen by seed."""
    rng = random.Random(seed)
    result = []
    for path in CHAPTERS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        bound = [n for n, shown, _, _ in pn.strict_numbers(nb)
                 if shown and n.binding and n.binding["bound"] == "printed"]
        made = 0
        for n in rng.sample(bound, len(bound)):
            if made == OUTPUT_PLANTS_PER_CHAPTER:
                break
            by, at, token = (n.binding[k] for k in ("by", "at", "token"))
            new = _stale_output(n, token, rng)
            planted = copy.deepcopy(nb)
            cell = planted["cells"][by]
            if new is None or not _replace_printed(cell, at, token, new):
                continue
            result.append((path, n.cell, n.token, f"cell {by}: {token} -> {new}",
                           planted))
            made += 1
    return result


def build_lock(tmp: Path) -> Path:
    """The lock of the unmodified chapters, beside their copies in ``tmp``."""
    file = pn.lock_file(tmp / CHAPTERS[0].name)
    file.parent.mkdir(parents=True, exist_ok=True)
    data = {p.stem: pn.bindings(json.loads(p.read_text(encoding="utf-8")))
            for p in CHAPTERS}
    file.write_text(pn._dump(data), encoding="utf-8")
    return file


def evaluate(tmp: Path, seed: int = SEED, lock: bool = True, outputs: bool = False):
    """(caught, missed): the plants flagged in the planted cell, and the rest.

    ``lock``: check against the lock of the unmodified chapters (else the strict
    check alone); ``outputs``: the output plants (else the prose plants).
    """
    tmp.mkdir(parents=True, exist_ok=True)
    if lock:
        build_lock(tmp)
    caught, missed = [], []
    for path, cell, old, new, planted in (output_plants if outputs else plants)(seed):
        copy_path = tmp / path.name
        copy_path.write_text(json.dumps(planted), encoding="utf-8")
        flags = pn.check_notebook(copy_path, lock=None if lock else False)
        number = (old if outputs else new).lower()
        hit = [f for f in flags if f.cell == cell and f.number.lower() == number]
        (caught if hit else missed).append((path.stem, cell, old, new, hit))
    return caught, missed


@pytest.mark.parametrize("outputs", [False, True], ids=["prose", "outputs"])
def test_planted_stale_numbers_are_flagged(tmp_path, outputs):
    caught, missed = evaluate(tmp_path, outputs=outputs)
    strict = evaluate(tmp_path / "strict", lock=False, outputs=outputs)
    total = len(caught) + len(missed)
    kind = "outputs moved under" if outputs else "stale numbers planted in"
    print(f"\n{kind} the prose, seed {SEED}: {len(caught)} of {total} flagged with the "
          f"lock; {len(strict[0])} of {total} by the strict check alone")
    assert total >= 10 and len({c[0] for c in caught + missed}) >= 5, (
        f"only {total} plants could be made: the evaluation needs at least 10 over "
        "several chapters")
    assert len(caught) >= CATCH_GOAL * total, (
        f"{len(caught)} of {total} {kind} the prose flagged; missed:\n"
        + "\n".join(f"  {ch}, cell {cell}: {old} -> {new}"
                    for ch, cell, old, new, _ in missed))
    for _, cell, old, new, [flag, *_] in caught:  # the message names the number, cell
        assert (old if outputs else new) in str(flag) and f"cell {cell}" in str(flag)


# --- the rules, on small synthetic notebooks ----------------------------------------


def _md(text):
    return {"cell_type": "markdown", "source": text}


def _code(source, printed="", name=None):
    cell = {"cell_type": "code", "source": source, "metadata": {},
            "outputs": [{"output_type": "stream", "name": "stdout", "text": printed}]
            if printed else []}
    if name:
        cell["metadata"] = {"mystnb": {"figure": {"name": name}}}
    return cell


def _flags(tmp_path, cells, quoted=None):
    meta = {"bnbook": {"quoted_numbers": quoted}} if quoted else {}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"metadata": meta, "cells": cells}))
    return [f.number for f in pn.check_notebook(path, strict=True, lock=False)]


FILLER = [_code("pass"), _md("Some words."), _code("pass"), _md("More words.")]


def test_a_number_is_bound_to_its_section(tmp_path):
    cells = [_md("# Title"), _md("## One"), _code("print(acc)", "accuracy 0.966"),
             _md("Here it is 0.966."), *FILLER,
             _md("## Two"), *FILLER, _md("There it was 0.966, and 0.97.")]
    # printed in section One only: quoted in section Two it is flagged, unless it is a
    # re-quote of a number bound in its own section: 0.966 is, 0.97 is not
    assert _flags(tmp_path, cells) == ["0.97"]
    cells[3] = _md("Here it is high.")  # now 0.966 is bound nowhere
    assert _flags(tmp_path, cells) == ["0.966", "0.97"]


def test_a_subsection_ends_at_the_next_heading_of_its_level(tmp_path):
    cells = [_md("## A\n### A.1"), _code("", "0.512 0.513"), *FILLER,
             _md("In A.1: 0.512."), _md("### A.2"), *FILLER,
             _md("In A.2: 0.513."), _md("## B"), *FILLER, _code("", "0.513")]
    # A.2 does not see A.1's code, even though both are in A
    assert _flags(tmp_path, cells) == ["0.513"]
    cells[0] = _md("## A\nA.1 is not a subsection: 0.513.")
    cells[6] = _md("Still A.")
    assert _flags(tmp_path, cells) == []


def test_the_code_cells_just_above_and_below_count_across_headings(tmp_path):
    cells = [_md("## A"), *FILLER, _code("", "0.733"),
             _md("## B\nAs printed just above, 0.733; and below, 0.417."),
             _code("", "0.417")]
    assert _flags(tmp_path, cells) == []


def test_a_reference_brings_the_section_or_figure_it_names(tmp_path):
    cells = [_md("(sec-a)=\n## A"), _code("", "0.733"), *FILLER,
             _code("plot()", "", name="fig-b"), *FILLER,
             _md("## C"), *FILLER,
             _md("As in {ref}`sec-a` (0.733) and {numref}`fig-b`."), *FILLER,
             _md("Again 0.734.")]
    assert _flags(tmp_path, cells) == ["0.734"]


def test_the_summary_restates_numbers_the_body_binds(tmp_path):
    cells = [_md("# T"), _md("(sec-a)=\n## A"), *FILLER, _code("", "0.951 0.953"),
             _md("We reach 0.951."), *FILLER, *FILLER,
             _md("## Summary\n- 0.951, and 0.953.")]
    # 0.951 is bound where the body quotes it; 0.953 is quoted only in the summary
    assert _flags(tmp_path, cells) == ["0.953"]
    cells[-1] = _md("## Summary\n- 0.951, and 0.953 ({ref}`sec-a`).")
    assert _flags(tmp_path, cells) == []


@pytest.mark.parametrize("prose, flagged", [
    ("Trained with lr = 0.37 for 730 steps on batches of 48.", []),
    ("The 48 random batches.", []),                 # a noun after a modifier
    ("A 5-730-48 network.", []),                    # the widths of a network
    ("It reaches 0.37 accuracy and 730 of them.", ["0.37", "730"]),  # not settings
    ("The cell checks that they agree within 0.37.", []),  # what a cell asserts
])
def test_a_number_in_code_counts_only_as_a_setting(tmp_path, prose, flagged):
    cells = [_md("## A"), _code("LR = 0.37\nfit(steps=730, batch_size=48)"),
             _md(prose)]
    assert _flags(tmp_path, cells) == flagged


@pytest.mark.parametrize("prose, flagged", [
    ("Batch norm gets there four times sooner.", []),       # 4.2 rounds to 4
    ("Batch norm gets there seven times sooner.", ["seven"]),
    ("It takes 3.5 to 4 times as many steps.", []),
    ("It takes 3.5 to 7 times as many steps.", ["7"]),
    ("It takes 4.2 times as long.", []),
    ("It takes 4.3 times as long.", ["4.3"]),
    ("A factor of 4 between them.", []),
    ("A factor of 8 between them.", ["8"]),
    ("It is twice as fast.", ["twice as"]),                 # nothing near 2 is printed
    ("The rate falls tenfold: from 2.94 to 0.3.", []),      # a quotient of the prose's
    ("The rate falls fivefold: from 2.94 to 0.3.", ["five"]),
    ("Three layers, seven runs, 7 steps: counts.", []),     # small counts stay exempt
])
def test_ratios_are_checked_in_digits_and_words(tmp_path, prose, flagged):
    cells = [_md("## A"), _code("", "ratio 4.2, steps 3.5, rates 2.94 0.3"), _md(prose)]
    assert _flags(tmp_path, cells) == flagged


def test_halving_is_a_ratio_of_two(tmp_path):
    cells = [_md("## A"), _code("", "before/after 1.96"), _md("Decay halves it.")]
    assert _flags(tmp_path, cells) == []
    cells[1] = _code("", "before/after 1.41")
    assert _flags(tmp_path, cells) == ["halves"]


def test_paper_numbers_are_listed_in_metadata_and_the_list_cannot_go_stale(tmp_path):
    quoted = {"50,000": "Ioffe & Szegedy (2015), Sec. 4.1",
              "4.9": "Ioffe & Szegedy (2015), Table 2"}
    cells = [_md("## A"), _code("", "0.5"),
             _md("The paper trains for 50,000 steps to 4.9% error, 14 times faster.")]
    assert _flags(tmp_path, cells, quoted) == ["14"]
    cells[2] = _md("The paper trains for 50,000 steps.")
    assert _flags(tmp_path, cells, quoted) == ["4.9"]  # stale entry


def test_a_flag_names_the_number_the_cell_and_where_it_is_printed(tmp_path):
    cells = [_md("## A"), _code("", "0.966"), *FILLER, _md("## B"), *FILLER,
             _code("", "0.969"), _md("The BN network reaches 0.969 here."),
             _code("", "0.5")]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"metadata": {}, "cells": cells}))
    assert pn.check_notebook(path, strict=True, lock=False) == []
    cells[-2] = _md("The BN network reaches 0.966 here.")
    path.write_text(json.dumps({"metadata": {}, "cells": cells}))
    [flag] = pn.check_notebook(path, strict=True, lock=False)
    text = str(flag)
    assert "0.966 in cell 12 (“The BN network reaches" in text
    assert "not in the outputs of cells 7, 9, 11, 13" in text
    assert "printed in cell 1, outside this section" in text
    cells[1] = _code("", "0.5")
    path.write_text(json.dumps({"metadata": {}, "cells": cells}))
    [flag] = pn.check_notebook(path, strict=True, lock=False)
    assert "nearest printed nearby: 0.969 in cell 11" in str(flag)


def test_the_loose_mode_is_the_first_version(tmp_path):
    cells = [_md("## A"), _code("", "0.966"), *FILLER, _md("## B"), *FILLER,
             _md("It reaches 0.966.")]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"metadata": {}, "cells": cells}))
    assert pn.check_notebook(path, strict=False) == []
    assert [f.number for f in pn.check_notebook(path, strict=True, lock=False)] == [
        "0.966"]
    default = pn.check_notebook(path, lock=False)  # pn.STRICT_BY_DEFAULT picks it
    assert len(default) == (1 if pn.STRICT_BY_DEFAULT else 0)


# --- the lock: each prose number's recorded binding ---------------------------------


def _chapter(tmp_path, cells, name="05_x.ipynb"):
    """A notebook with cell ids, as nbformat 4.5 writes them."""
    cells = copy.deepcopy(cells)
    for i, cell in enumerate(cells):
        cell["id"] = f"c{i:02d}"
    path = tmp_path / name
    path.write_text(json.dumps({"metadata": {}, "cells": cells}), encoding="utf-8")
    return path


def _edit(path, cell, **changes):
    nb = json.loads(path.read_text(encoding="utf-8"))
    nb["cells"][cell].update(changes)
    path.write_text(json.dumps(nb), encoding="utf-8")


def _printed(text):
    return {"outputs": [{"output_type": "stream", "name": "stdout", "text": text}]}


# 0.966 is printed in cell 2; section B prints 0.969 and 0.951 (in cells 9 and 11)
LOCKED = [_md("# T"), _md("## A"), _code("print(acc)", "accuracy 0.966"),
          _md("The plain network reaches 0.966 with lr = 0.37."),
          _code("fit(lr=0.37)"), _md("## B"), *FILLER,
          _code("", "BN 0.969, plain 0.951"), _md("The BN network reaches 0.969."),
          _code("", "0.951")]


def _messages(path):
    return [str(f) for f in pn.check_notebook(path)]


def test_a_bound_chapter_checks_clean_and_records_what_shows_each_number(tmp_path):
    path = _chapter(tmp_path, LOCKED)
    [missing] = _messages(path)
    assert "no binding of its 3 prose numbers is recorded" in missing
    assert f"--bind {path}" in missing
    assert pn.main(["--bind", str(path)]) == 0
    assert _messages(path) == []
    record = json.loads(pn.lock_file(path).read_text())["05_x"]
    assert record == [
        {"cell": "c03", "number": "0.966", "occurrence": 0, "bound": "printed",
         "by": "c02", "token": "0.966", "at": 0, "of": 1, "count": 1},
        {"cell": "c03", "number": "0.37", "occurrence": 0, "bound": "setting in code",
         "by": "c04", "token": "0.37"},
        {"cell": "c11", "number": "0.969", "occurrence": 0, "bound": "printed",
         "by": "c10", "token": "0.969", "at": 0, "of": 2, "count": 1}]


def test_a_changed_prose_number_is_flagged_even_where_the_section_prints_it(tmp_path):
    path = _chapter(tmp_path, LOCKED)
    pn.bind([path])
    # the stale 0.951 is printed beside it: the strict check alone lets it through
    _edit(path, 11, source="The BN network reaches 0.951.")
    assert pn.check_notebook(path, lock=False) == []
    [flag] = pn.check_notebook(path)
    assert (flag.cell, flag.number) == (11, "0.951")
    assert str(flag).startswith(
        f"{path}: 0.951 in cell 11 (“The BN network reaches 0.951.”) has no recorded "
        "binding: it is new or changed; the lock records 0.969 here, bound to 0.969 "
        "printed by cell 10, which the prose no longer has. The strict check binds it "
        "to 0.951 printed by cell 10: check it against the output it quotes, then run "
        f"`python scripts/prose_numbers.py --bind {path}`")


def test_a_changed_output_is_flagged_even_where_the_section_prints_the_number(tmp_path):
    path = _chapter(tmp_path, LOCKED)
    pn.bind([path])
    # a re-run moved the output the prose quotes; 0.969 is still printed nearby
    _edit(path, 10, **_printed("BN 0.951, plain 0.969"))
    assert pn.check_notebook(path, lock=False) == []
    [flag] = pn.check_notebook(path)
    assert (flag.cell, flag.number) == (11, "0.969")
    assert str(flag).startswith(
        f"{path}: 0.969 in cell 11 (“The BN network reaches 0.969.”) was bound to "
        "0.969 printed by cell 10, which now prints 0.951 in its place: re-read what "
        "the sentence quotes; fix the prose if it no longer says what the output "
        f"shows, then run `python scripts/prose_numbers.py --bind {path}`")
    # the output moved, the number the prose quotes did not: the binding holds
    _edit(path, 10, **_printed("epoch 3\nBN 0.969, plain 0.951"))
    assert pn.check_notebook(path) == []
    # a setting changed under the prose; a constant elsewhere still writes 0.37
    _edit(path, 4, source="fit(lr=0.38)")
    _edit(path, 6, source="OLD_LR = 0.37")
    assert pn.check_notebook(path, lock=False) == []
    [flag] = pn.check_notebook(path)
    assert "0.37 in cell 3" in str(flag)
    assert "the setting 0.37 written in cell 4, whose code no longer writes it" in str(
        flag)


def test_a_recorded_number_the_prose_no_longer_has_is_flagged(tmp_path):
    path = _chapter(tmp_path, LOCKED)
    pn.bind([path])
    _edit(path, 11, source="The BN network does better.")
    [flag] = pn.check_notebook(path)
    assert str(flag) == (
        f"{path}: the lock records 0.969 in cell 11 (“The BN network does better.”), "
        "bound to 0.969 printed by cell 10, but the prose there no longer has it: if "
        "it was removed or changed on purpose, run `python scripts/prose_numbers.py "
        f"--bind {path}`")
    nb = json.loads(path.read_text())
    del nb["cells"][11]  # a deleted cell: named by its id
    path.write_text(json.dumps(nb))
    [flag] = pn.check_notebook(path)
    assert "0.969 in a Markdown cell (id c11) that is no longer in the chapter" in str(
        flag)
    pn.bind([path])
    assert pn.check_notebook(path) == []


def test_bind_refuses_while_the_strict_check_flags(tmp_path, capsys):
    path = _chapter(tmp_path, LOCKED)
    pn.bind([path])
    before = pn.lock_file(path).read_bytes()
    _edit(path, 11, source="The BN network reaches 0.979.")  # printed nowhere
    assert pn.main(["--bind", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "0.979 in cell 11" in out and "NOT recorded" in err
    assert pn.lock_file(path).read_bytes() == before


def test_a_rebind_is_byte_identical_and_touches_its_own_chapter_only(tmp_path, capsys):
    one, two = _chapter(tmp_path, LOCKED), _chapter(tmp_path, LOCKED, "06_y.ipynb")
    assert pn.main(["--bind", str(one), str(two)]) == 0
    before = pn.lock_file(one).read_bytes()
    assert pn.main(["--bind", str(one)]) == 0
    assert pn.lock_file(one).read_bytes() == before
    assert "3 prose numbers bound, 0 change(s)" in capsys.readouterr().out
    _edit(two, 11, source="The BN network reaches 0.951.")
    pn.bind([two])
    out = capsys.readouterr().out
    assert "  + 0.951 in cell 11: 0.951 printed by cell 10" in out
    assert "  - 0.969 in cell 11: dropped" in out
    data = json.loads(pn.lock_file(one).read_text())
    assert data["05_x"] == json.loads(before)["05_x"]
    assert [e["number"] for e in data["06_y"]] == ["0.966", "0.37", "0.951"]
    assert list(json.loads(before)) == ["05_x", "06_y"]
