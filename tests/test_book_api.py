"""The API reference page (book/api.md): every public name documented, and the docstring
preprocessor (book/_ext/bnlib_docstrings.py) that lets bnlib's plain-text docstrings
build without warnings.

The build itself (`make book`, zero warnings with -W -n) checks that each documented
name imports and that its cross-references resolve; this file checks that no public
name is missing from the page, which the build cannot see.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import bnlib

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = ROOT / "book" / "api.md"
# ".. autofunction:: bnlib.fold.fold_batchnorm", ".. py:data:: bnlib.__version__", ...
DIRECTIVE = re.compile(r"^\s*\.\. (auto\w+|py:\w+):: (bnlib[\w.]*)", re.MULTILINE)

MODULES = ["bnlib"] + sorted(
    f"bnlib.{m.name}" for m in pkgutil.iter_modules(bnlib.__path__)
    if not m.name.startswith("_")
)


def _documented() -> dict[str, str]:
    """Documented full name -> directive, from the page's source."""
    return {name: kind for kind, name in DIRECTIVE.findall(API_PAGE.read_text())}


def _resolve(full_name: str):
    module, _, attr = full_name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def test_the_page_is_in_the_table_of_contents():
    assert "file: book/api\n" in (ROOT / "_toc.yml").read_text()


@pytest.mark.parametrize("module", MODULES)
def test_every_module_is_on_the_page(module):
    assert _documented().get(module) == "automodule", (
        f"{module} has no '.. automodule:: {module}' in {API_PAGE.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_documented(module):
    """Each name in __all__ has a directive of its own, or, for a re-export (the same
    object as another module's name), the original is documented."""
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    assert names, f"{module} has no __all__, so its public names are not defined"
    documented = _documented()
    missing = []
    for name in names:
        if f"{module}.{name}" in documented:
            continue
        obj = getattr(mod, name)
        elsewhere = [d for d in documented if d.rpartition(".")[2] == name
                     and _resolve(d) is obj and not isinstance(obj, str | int | float)]
        if not elsewhere:
            missing.append(name)
    assert not missing, (
        f"public names of {module} missing from {API_PAGE.relative_to(ROOT)}: "
        f"{missing}; add e.g. '.. autofunction:: {module}.{missing[0]}'"
    )


def test_no_directive_names_a_missing_object():
    """The other way round (the build fails on it too, but later and less clearly)."""
    gone = [d for d, kind in _documented().items()
            if kind != "automodule" and _resolve(d) is None]
    assert not gone


# ------------------------------------------------------------ docstring preprocessor

sys.path.insert(0, str(ROOT / "book" / "_ext"))
from bnlib_docstrings import convert  # noqa: E402


def test_shape_stars_are_escaped_outside_literals():
    lines = ["x: (N, C, *spatial) and ``(N, C, *spatial)``, (*shape), a * b, *emph*"]
    assert convert(lines) == [
        r"x: (N, C, \*spatial) and ``(N, C, *spatial)``, (\*shape), a * b, *emph*"
    ]


def test_an_indented_block_under_a_colon_becomes_a_literal_block():
    lines = ["The closed form:", "", "    forward:  y = f(x)", "              z = g(y)",
             "", "and more."]
    assert convert(lines) == ["The closed form::", "", "    forward:  y = f(x)",
                              "              z = g(y)", "", "and more."]


def test_an_indented_block_right_under_a_colon_gets_its_blank_line():
    lines = ["Forward graph:", "    xc = x - mu", "    y = xc * inv", "Done."]
    assert convert(lines) == ["Forward graph::", "", "    xc = x - mu",
                              "    y = xc * inv", "", "Done."]


def test_an_indented_block_after_any_paragraph_becomes_a_literal_block():
    lines = ["The command is", "", "    python -m bnlib.bench", "", "Then."]
    assert convert(lines) == ["The command is", "", "::", "",
                              "    python -m bnlib.bench", "", "Then."]


def test_a_list_under_a_colon_gets_its_blank_line():
    assert convert(["Inputs:", "- x: (N, C)", "- eps: > 0"]) == [
        "Inputs:", "", "- x: (N, C)", "- eps: > 0"]


def test_rest_passes_through_unchanged():
    lines = ["Returns ``(dx, dgamma)``::", "", "    dx = f(dy)", "", "- a list item",
             "  continued", "", "  and a second paragraph of the item", "",
             "A paragraph."]
    assert convert(lines) == lines
