"""Re-execute the book's notebooks in place, top to bottom, and time each one.

    python scripts/execute_notebooks.py [book/01_premise.ipynb ...]
    python scripts/execute_notebooks.py --check [--out DIR] [chapters ...]

Outputs are stored without timing metadata, so a re-run that prints the same numbers
leaves the file unchanged (diff-friendly). Exits non-zero if a notebook fails, or runs
over its budget (on 2 cores: 20 s each, 90 s for Part I, chapters 1-6, and 200 s for
the whole book).

``--check`` runs every chapter without writing it back (``--out DIR`` keeps the
executed copies there) and reports each chapter whose run raised, with the cell and
the error: with ``BNLIB_ARITHMETIC=native`` in the environment, that is the check
that every asserted claim holds on this CPU's own arithmetic, not only on the book's
pinned path. Times are printed, budgets not enforced (a loaded CI machine is slow).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

BUDGET_EACH, BUDGET_PART_I, BUDGET_ALL = 20.0, 90.0, 200.0
PART_I = {f"{n:02d}" for n in range(1, 7)}
ROOT = Path(__file__).resolve().parent.parent


def _merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) outputs into one, as Jupyter shows them."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (out.output_type == "stream" and prev is not None
                and prev.output_type == "stream" and prev.name == out.name):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def _minimal_traceback(cell) -> None:
    """A cell that raises on purpose (tagged ``raises-exception``) keeps only its
    error's last line, ``ValueError: ...``, as IPython's Minimal mode prints it: one
    sees the message the cell is there to show, and no frames with the paths of the
    machine that executed it (nbval compares the error's name and message, not its
    frames)."""
    if "raises-exception" not in cell.metadata.get("tags", []):
        return
    for out in cell.outputs:
        if out.output_type == "error":
            out.traceback = [f"\x1b[31m{out.ename}\x1b[39m: {out.evalue}"]


def execute(path: Path, out: Path | None = None, keep_going: bool = False):
    """Run one chapter top to bottom and write it to ``out`` (default: in place).

    Returns (seconds, notebook). With ``keep_going``, a cell that raises does not stop
    the run: its error is kept in its outputs (see :func:`errors`).
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", record_timing=False,
                            allow_errors=keep_going,
                            resources={"metadata": {"path": str(ROOT)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = _merge_streams(cell.outputs)
            _minimal_traceback(cell)
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, out or path)
    return seconds, nb


def errors(nb) -> list[str]:
    """'cell N: AssertionError: ...' for each code cell that raised unexpectedly."""
    found = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    for n, cell in enumerate(code, start=1):
        if "raises-exception" in cell.metadata.get("tags", []):
            continue
        for out in cell.outputs:
            if out.output_type == "error":
                value = re.sub(r"\x1b\[[0-9;]*m", "", out.evalue).splitlines()
                found.append(f"code cell {n}: {out.ename}: {value[0] if value else ''}")
    return found


def check(paths: list[Path], out_dir: Path | None) -> int:
    """Execute each chapter without writing it back; report every cell that raises."""
    mode = os.environ.get("BNLIB_ARITHMETIC") or "pinned"
    failed = []
    for path in paths:
        out = out_dir / path.name if out_dir else Path(os.devnull)
        seconds, nb = execute(path, out, keep_going=True)
        found = errors(nb)
        failed += [f"{path.name}, {line}" for line in found]
        status = f"FAILED ({len(found)} cells raised)" if found else "ok"
        print(f"{path.name:40s} {seconds:6.1f} s  {status}", flush=True)
    if failed:
        print(f"\n{len(failed)} cells raised on the {mode} arithmetic:",
              file=sys.stderr)
        for line in failed:
            print("  " + line, file=sys.stderr)
        return 1
    print(f"{len(paths)} chapters ran, every assert held ({mode} arithmetic)")
    return 0


def main(argv: list[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    chapters = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
    out_dir = None
    if "--out" in argv:
        i = argv.index("--out")
        out_dir = Path(argv[i + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        argv = argv[:i] + argv[i + 2:]
    if "--check" in argv:
        argv = [a for a in argv if a != "--check"]
        return check([Path(p) for p in argv] or chapters, out_dir)
    paths = [Path(p) for p in argv] or chapters
    total, part_i, over = 0.0, 0.0, []
    for path in paths:
        seconds, _ = execute(path)
        total += seconds
        part_i += seconds if path.name[:2] in PART_I else 0.0
        over_budget = seconds > BUDGET_EACH
        flag = f"  OVER the {BUDGET_EACH:.0f} s budget" if over_budget else ""
        print(f"{path.name:40s} {seconds:6.1f} s{flag}", flush=True)
        if flag:
            over.append(path.name)
    print(f"{'Part I':40s} {part_i:6.1f} s (budget {BUDGET_PART_I:.0f} s)")
    print(f"{'total':40s} {total:6.1f} s (budget {BUDGET_ALL:.0f} s)")
    if part_i > BUDGET_PART_I:
        over.append("Part I")
    if not argv and total > BUDGET_ALL:
        over.append("the whole book")
    if over:
        print("over budget:", ", ".join(over), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
