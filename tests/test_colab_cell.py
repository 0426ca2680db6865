"""The launch buttons: every chapter's Colab install cell, and Binder's configuration.

The install cell (scripts/colab_cell.py) must be a silent no-op anywhere but Colab
(nbval re-runs it and expects no output), and on Colab install bnlib from the repo in
_config.yml, without touching Colab's torch. A fresh environment built from binder/ is
checked by `make binder-check` (minutes, so not part of `make test`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_cell = _load("colab_cell")
binder_requirements = _load("binder_requirements")
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def _fake_find_spec(missing: set[str]):
    return lambda name: None if name in missing else object()


# ------------------------------------------------------------------ the install logic


def test_not_on_colab_nothing_runs():
    calls = []
    colab_cell._colab_install("bnlib @ x", on_colab=False,
                              find_spec=_fake_find_spec({"bnlib", "mlxtend"}),
                              run=calls.append)
    assert calls == []


def test_on_colab_without_bnlib_pip_installs_it_without_dependencies():
    calls = []
    colab_cell._colab_install("bnlib @ git+https://example.org/book.git@main",
                              on_colab=True, find_spec=_fake_find_spec({"bnlib"}),
                              run=calls.append)
    assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                      "bnlib @ git+https://example.org/book.git@main"]]


def test_on_colab_missing_extras_are_installed_and_torch_never():
    calls = []
    missing = {"bnlib", "mlxtend", "sklearn"}
    colab_cell._colab_install("bnlib @ x", on_colab=True,
                              find_spec=_fake_find_spec(missing), run=calls.append)
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "bnlib @ x"],
        [sys.executable, "-m", "pip", "install", "--quiet", "mlxtend", "scikit-learn"],
    ]
    assert not any("torch" in arg for call in calls for arg in call)


def test_on_colab_with_everything_installed_nothing_runs():
    calls = []
    colab_cell._colab_install("bnlib @ x", on_colab=True,
                              find_spec=_fake_find_spec(set()), run=calls.append)
    assert calls == []


def test_the_requirement_comes_from_config(tmp_path):
    config = tmp_path / "_config.yml"
    config.write_text("repository:\n  url: https://github.com/someone/fork/\n"
                      "  branch: course-2026\n")
    assert colab_cell.bnlib_requirement(config) == (
        "bnlib @ git+https://github.com/someone/fork.git@course-2026")
    repo = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    assert repo["url"] in colab_cell.cell_source()


# -------------------------------------------------------------- the cell as it stands


def _run_cell(source: str, capsys) -> str:
    exec(compile(source, "<colab-install-cell>", "exec"), {"__name__": "__main__"})
    return capsys.readouterr().out


def test_the_cell_is_silent_and_installs_nothing_here(monkeypatch, capsys):
    monkeypatch.setenv("BNLIB_ARITHMETIC", "pinned")  # the cell's setdefault keeps it
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"the cell ran a command outside Colab: {args}")

    monkeypatch.setattr(subprocess, "check_call", forbidden)
    assert _run_cell(colab_cell.cell_source(), capsys) == ""


def test_the_cell_on_a_simulated_colab(monkeypatch, capsys):
    """The whole cell, as stored, on a 'Colab' where bnlib and mlxtend are missing."""
    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setenv("BNLIB_ARITHMETIC", "pinned")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "simulated")
    monkeypatch.setattr(subprocess, "check_call", calls.append)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name in ("bnlib", "mlxtend") else real_find_spec(name, *a))
    source = nbformat.read(CHAPTERS[0], as_version=4).cells[0].source
    assert _run_cell(source, capsys) == ""
    assert calls == [
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         colab_cell.bnlib_requirement()],
        [sys.executable, "-m", "pip", "install", "--quiet", "mlxtend"],
    ]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_chapter_starts_with_the_current_install_cell(path):
    assert colab_cell.problems(path, colab_cell.cell_source()) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_the_first_code_cell_after_it_is_still_the_setup_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells[1:] if c.cell_type == "code"]
    assert "setup(" in code[0].source
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "re-execute: make execute"


# --------------------------------------------------------------------------- Binder


def test_binder_requirements_are_up_to_date():
    text = (ROOT / "binder" / "requirements.txt").read_text()
    assert text == binder_requirements.render(), (
        "run: python scripts/binder_requirements.py --write")


def test_binder_pins_agree_with_the_root_requirements():
    pins = binder_requirements.root_pins()
    lines = (ROOT / "binder" / "requirements.txt").read_text().splitlines()
    binder = dict(line.split("==") for line in lines
                  if "==" in line and not line.startswith("#"))
    assert binder and all(pins[name] == version for name, version in binder.items())
    assert binder["torch"] == pins["torch"]
    assert f"--extra-index-url {binder_requirements.CPU_INDEX}" in lines


def test_binder_python_and_postbuild():
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    assert runtime == f"python-{sys.version_info.major}.{sys.version_info.minor}"
    post = ROOT / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111, "postBuild must be executable"
    assert "pip install --no-cache-dir --no-deps -e ." in post.read_text()
