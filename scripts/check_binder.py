"""Build a fresh environment the way Binder does from binder/, and run a chapter in it.

    python scripts/check_binder.py [book/01_premise.ipynb ...]   (make binder-check)

Binder (repo2docker) starts from an image whose environment already runs Jupyter
(server, ipykernel), installs binder/requirements.txt into it, and runs binder/postBuild
from the repository root. This script does the same, in order, in a new virtualenv
under a temporary directory, with a copy of the repository (its tracked files and the
untracked ones git does not ignore, as a clone would have after a commit):

1. a venv with Python of binder/runtime.txt's version, and ipykernel + nbclient
   (unpinned, standing in for the Jupyter that Binder's image provides);
2. ``pip install -r binder/requirements.txt``;
3. ``binder/postBuild``;
4. each chapter executed top to bottom (default: the first), its Colab cell included,
   and its text outputs compared with the stored ones (cells tagged
   ``nbval-ignore-output`` skipped, as nbval does).

It takes minutes, so it is not part of `make test`. Offline or behind a proxy, when
PyTorch's CPU index (download.pytorch.org) cannot be reached, it says so and installs
binder/requirements.txt without its ``--extra-index-url`` line, so that
``torch==2.13.0`` comes from this machine's own pip configuration (a local CPU wheel on
the book's build machine) instead: the same version, a different source.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Run inside the new environment: execute one chapter, compare text outputs.
RUN_CHAPTER = r"""
import re, sys, time
import nbformat
from nbclient import NotebookClient
from jupyter_client.kernelspec import KernelSpecManager

spec = KernelSpecManager().get_kernel_spec("python3")
print("kernel:", " ".join(spec.argv[:3]))
path = sys.argv[1]
stored = nbformat.read(path, as_version=4)
nb = nbformat.read(path, as_version=4)
start = time.perf_counter()
NotebookClient(nb, timeout=600, kernel_name="python3",
               resources={"metadata": {"path": "."}}).execute()
seconds = time.perf_counter() - start

def text(cell):
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out.append(o.text)
        elif "data" in o and "text/plain" in o.data:
            out.append(o.data["text/plain"])
    return re.sub(r"at 0x[0-9a-f]+", "at 0xADDRESS", "".join(out))

differ = [i for i, (a, b) in enumerate(zip(stored.cells, nb.cells))
          if a.cell_type == "code"
          and "nbval-ignore-output" not in a.metadata.get("tags", [])
          and text(a) != text(b)]
print(f"{path}: executed in {seconds:.1f} s; {len(differ)} cells' text outputs "
      f"differ from the stored ones{': ' + str(differ) if differ else ''}")
for i in differ[:3]:
    print(f"--- cell {i} stored:\n{text(stored.cells[i])[:600]}\n"
          f"--- cell {i} now:\n{text(nb.cells[i])[:600]}")
sys.exit(1 if differ else 0)
"""


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(cmd: list[str], **kwargs) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def reachable(url: str, timeout: float = 5.0) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
        return True
    except OSError:
        return False


def copy_repository(dest: Path) -> None:
    """Tracked files and untracked ones not ignored: what a clone of a commit has."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def python_for(runtime: str) -> str:
    version = runtime.strip().removeprefix("python-")
    exe = shutil.which(f"python{version}")
    if exe is None:
        sys.exit(f"binder/runtime.txt asks for Python {version}: python{version} "
                 "is not on PATH")
    return exe


def main(argv: list[str]) -> int:
    chapters = argv or ["book/01_premise.ipynb"]
    t0 = time.perf_counter()
    python = python_for((BINDER / "runtime.txt").read_text())
    with tempfile.TemporaryDirectory(prefix="binder-check-") as tmp:
        repo, venv = Path(tmp) / "repo", Path(tmp) / "venv"
        t = step(f"a copy of the repository and a fresh venv ({python})")
        copy_repository(repo)
        run([python, "-m", "venv", str(venv)])
        env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   VIRTUAL_ENV=str(venv), OMP_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-cache-dir",
               "--quiet"]
        run([*pip, "ipykernel", "nbclient", "nbformat"], env=env)
        print(f"   {time.perf_counter() - t:.0f} s")

        t = step("pip install -r binder/requirements.txt")
        requirements = repo / "binder" / "requirements.txt"
        if not reachable(CPU_INDEX + "/torch/"):
            lines = requirements.read_text().splitlines(keepends=True)
            local = Path(tmp) / "requirements-local.txt"
            local.write_text("".join(ln for ln in lines if not re.match(
                r"\s*--(extra-)?index-url\b", ln)))
            print(f"NOTE: {CPU_INDEX} cannot be reached from here, so the "
                  "--extra-index-url line of binder/requirements.txt is left out and "
                  "torch comes from this machine's pip configuration (pip config list) "
                  "at the same pinned version. Binder itself uses the CPU index.",
                  flush=True)
            requirements = local
        run([*pip, "-r", str(requirements)], env=env)
        print(f"   {time.perf_counter() - t:.0f} s")

        t = step("binder/postBuild")
        run(["./binder/postBuild"], cwd=repo, env=env)
        run([str(venv / "bin" / "python"), "-c",
             "import bnlib, torch; print('bnlib', bnlib.__version__, 'from', "
             "bnlib.__file__); print('torch', torch.__version__)"], cwd=Path(tmp),
            env=env)
        print(f"   {time.perf_counter() - t:.0f} s")

        failed = []
        for chapter in chapters:
            step(f"run {chapter}")
            result = subprocess.run([str(venv / "bin" / "python"), "-c", RUN_CHAPTER,
                                     chapter], cwd=repo, env=env)
            if result.returncode:
                failed.append(chapter)
    total = time.perf_counter() - t0
    print(f"\nbinder-check: {'FAILED ' + ', '.join(failed) if failed else 'ok'} "
          f"in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
