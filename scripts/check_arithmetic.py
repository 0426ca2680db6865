"""Can this machine reproduce the book's stored outputs to the digit? Ask before nbval.

    python scripts/check_arithmetic.py          # prints 'compare' or 'claims' on stdout
    python scripts/check_arithmetic.py --write  # store this machine's fingerprint

The stored outputs were made on the pinned arithmetic of bnlib/repro.py. Every x86-64
CPU with AVX2 computes the same bits on that path with the same torch and NumPy, which
the fingerprint (bnlib.repro.fingerprint: a hash of a few operations of each kind the
book uses) checks in a fresh interpreter, pinned as a chapter pins itself:

- it matches book/data/arithmetic.json: 'compare' (nbval compares every output);
- it differs on a machine that cannot match (not x86-64, no AVX2, other torch or
  NumPy versions): 'claims' (every chapter is executed and every assert checked, but
  outputs are not compared), with one line that says why;
- it differs on a machine that should match: exit 1, naming the operations that
  differ, instead of letting nbval report dozens of differing cells.

``BNBOOK_OUTPUTS=compare`` or ``BNBOOK_OUTPUTS=claims`` forces the mode.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "book" / "data" / "arithmetic.json"
PROBE = "import json, bnlib; print(json.dumps(bnlib.repro.fingerprint()))"


def measure() -> dict[str, str]:
    """This machine's fingerprint on the pinned path, in a fresh interpreter."""
    env = {**os.environ, "BNLIB_ARITHMETIC": "pinned"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def why_it_cannot_match(stored: dict, mine: dict) -> list[str]:
    """Reasons this machine is not expected to reproduce the bits (empty: it should)."""
    from bnlib.repro import cpu_has_avx2

    reasons = []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        reasons.append(f"this is {platform.machine()}, not x86-64")
    elif not cpu_has_avx2():
        reasons.append("this x86-64 CPU has no AVX2")
    for lib in ("torch", "numpy"):
        if stored["fingerprint"][lib] != mine[lib]:
            reasons.append(f"{lib} {mine[lib]} (the book's outputs were made with "
                           f"{stored['fingerprint'][lib]})")
    return reasons


def decide(stored: dict, mine: dict, forced: str = "") -> tuple[str, str]:
    """(mode, the line that explains it); mode 'error' where it should match, but
    does not."""
    if forced:
        if forced not in ("compare", "claims"):
            return "error", ("BNBOOK_OUTPUTS must be 'compare' or 'claims', "
                             f"not {forced!r}")
        return forced, f"arithmetic: BNBOOK_OUTPUTS={forced} (set by you)"
    differ = [k for k, v in stored["fingerprint"].items() if mine.get(k) != v]
    if not differ:
        return "compare", ("arithmetic: this machine computes the book's bits "
                           "(fingerprint matches): every stored output is compared")
    reasons = why_it_cannot_match(stored, mine)
    if reasons:
        return "claims", ("arithmetic: stored outputs are not compared, since "
                          + "; ".join(reasons) + ". Checking the claims instead: every "
                          "chapter is executed and every assert must hold "
                          "(BNBOOK_OUTPUTS=compare compares them anyway)")
    return "error", (
        "arithmetic: this machine should reproduce the book's outputs (x86-64 with "
        f"AVX2, the same torch and NumPy), but on the pinned path it computes other "
        f"bits for: {', '.join(differ)}. The pinning (bnlib/repro.py) does not hold "
        "here; please report it with `python -c 'import bnlib.repro as r; "
        "print(r.fingerprint())'`. BNBOOK_OUTPUTS=claims checks the claims only.")


def main(argv: list[str]) -> int:
    mine = measure()
    if "--write" in argv:
        made_on = f"{platform.machine()}, {cpu_model()}"
        record = {"fingerprint": mine, "made on": made_on,
                  "date": date.today().isoformat(),
                  "pinned path": "bnlib.repro.PINNED_ENV"}
        STORED.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {STORED.relative_to(ROOT)}")
        return 0
    stored = json.loads(STORED.read_text())
    mode, line = decide(stored, mine, os.environ.get("BNBOOK_OUTPUTS", "").strip())
    print(line, file=sys.stderr)
    if mode == "error":
        return 1
    print(mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
