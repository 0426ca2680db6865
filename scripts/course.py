"""The course kit's commands: build the student notebooks, grade a submission offline.

    python scripts/course.py build [OUT]     # make course (OUT: _build/course)
    python scripts/course.py grade NB [OUT]  # make grade NB=...; last line score: X / Y

The grader is Otter-Grader (pinned in requirements.txt). ``build`` runs ``otter assign``
on each master notebook in ``course/`` and lays the result out as

    OUT/student/<assignment>.ipynb        hand these out (no solutions, public tests)
    OUT/autograder/<assignment>.zip       Otter's autograder (hidden tests included)
    OUT/solutions/<assignment>.ipynb      the master with solutions, outputs cleared
    OUT/wrong/<mistake>.ipynb             the kept wrong submissions (course/wrong/*.py)

``grade`` runs Otter's non-containerized grader (``otter.api.grade_submission``, no
Docker, no network) in this environment and prints, per question, each test's result
and, for a failed test, the message that says what is wrong; its last line is
``score: X / Y`` (autograded points; hand-graded questions are listed, not scored).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COURSE = ROOT / "course"
WRONG = COURSE / "wrong"
DEFAULT_OUT = ROOT / "_build" / "course"


def masters() -> list[Path]:
    """The master notebooks: course/a*.ipynb, in order."""
    return sorted(COURSE.glob("a[0-9]*.ipynb"))


def _quiet_imports() -> None:
    """Skip jsonschema's optional RFC 3987 checker (rfc3987_syntax builds a parser at
    import: 3 s of CPU, for a URI format no notebook here uses). Otter imports nbformat,
    which imports jsonschema; blocking the optional module only drops that format."""
    sys.modules.setdefault("rfc3987_syntax", None)


@contextlib.contextmanager
def _captured_fds():
    """Capture what the grader and its kernel write to file descriptors 1 and 2 (the
    kernel's warnings bypass sys.stdout); yields a buffer, read after the block."""
    buf = io.StringIO()
    with tempfile.TemporaryFile(mode="w+") as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            buf.write(tmp.read())


# ----------------------------------------------------------------------------- build


def build(out: Path = DEFAULT_OUT, run_tests: bool = False) -> Path:
    """Run otter assign on every master; lay out student/autograder/solutions/wrong."""
    _quiet_imports()
    from otter.assign import main as otter_assign

    out = Path(out)
    for sub in ("student", "autograder", "solutions", "wrong"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        for master in masters():
            name = master.stem
            dist = Path(tmp) / name
            with _captured_fds() as log, contextlib.chdir(COURSE):
                try:
                    otter_assign(str(master), str(dist), no_run_tests=not run_tests)
                except BaseException as e:
                    raise RuntimeError(
                        f"otter assign {master.name} failed: {e}\n{log.getvalue()}"
                    ) from e
            shutil.copy(dist / "student" / master.name, out / "student" / master.name)
            (zip_path,) = (dist / "autograder").glob("*.zip")
            shutil.copy(zip_path, out / "autograder" / f"{name}.zip")
            shutil.copy(
                dist / "autograder" / master.name, out / "solutions" / master.name
            )
    for spec in sorted(WRONG.glob("*.py")):
        write_wrong_submission(spec, out)
    return out


# ----------------------------------------------------------------------------- wrong


@dataclass
class WrongSpec:
    """A kept wrong submission: the solutions with some functions replaced."""

    path: Path
    assignment: str
    loses: list[str]  # "q2/test_q2_unbiased_running_var", ...
    says: list[str]  # substrings the grader's output must contain
    functions: dict[str, str] = field(default_factory=dict)  # name -> source


def read_wrong_spec(path: Path) -> WrongSpec:
    """Parse course/wrong/<mistake>.py: a docstring header, then the wrong functions."""
    src = Path(path).read_text()
    tree = ast.parse(src)
    doc = ast.get_docstring(tree) or ""
    fields: dict[str, list[str]] = {"assignment": [], "loses": [], "says": []}
    for line in doc.splitlines():
        m = re.match(r"^(assignment|loses|says):\s*(.*)$", line.strip())
        if m:
            fields[m.group(1)].append(m.group(2).strip())
    if not fields["assignment"] or not fields["loses"] or not fields["says"]:
        raise ValueError(
            f"{path}: the docstring needs assignment:, loses: and says: lines"
        )
    lines = src.splitlines()
    functions = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    loses = [
        t.strip() for item in fields["loses"] for t in item.split(",") if t.strip()
    ]
    return WrongSpec(
        Path(path), fields["assignment"][0], loses, fields["says"], functions
    )


def write_wrong_submission(spec_path: Path, out: Path) -> Path:
    """The solutions notebook with the spec's functions in place of the right ones."""
    import nbformat

    spec = read_wrong_spec(spec_path)
    sol = Path(out) / "solutions" / f"{spec.assignment}.ipynb"
    nb = nbformat.read(sol, as_version=4)
    for fname, fsrc in spec.functions.items():
        hits = []
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                continue
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name == fname:
                    hits.append((cell, node))
        if len(hits) != 1:
            raise ValueError(f"{spec_path.name}: no single def of {fname} in {sol}")
        cell, node = hits[0]
        lines = cell.source.splitlines()
        lines[node.lineno - 1 : node.end_lineno] = fsrc.splitlines()
        cell.source = "\n".join(lines)
    dest = Path(out) / "wrong" / f"{spec_path.stem}.ipynb"
    nbformat.write(nb, dest)
    return dest


# ----------------------------------------------------------------------------- grade


@dataclass
class TestResult:
    question: str
    name: str  # the test function's name
    hidden: bool
    points: float
    passed: bool
    message: str  # the failure message, "" if passed


@dataclass
class Report:
    assignment: str
    tests: list[TestResult]
    manual: list[tuple[str, float]]  # hand-graded questions and their points
    error: str = ""  # a grader-level failure (never expected)

    @property
    def score(self) -> float:
        return sum(t.points for t in self.tests if t.passed)

    @property
    def possible(self) -> float:
        return sum(t.points for t in self.tests)

    def question_score(self, q: str) -> tuple[float, float]:
        ts = [t for t in self.tests if t.question == q]
        return sum(t.points for t in ts if t.passed), sum(t.points for t in ts)

    def lost(self) -> list[str]:
        return [f"{t.question}/{t.name}" for t in self.tests if not t.passed]

    def text(self) -> str:
        lines = [f"assignment {self.assignment}"]
        for q in dict.fromkeys(t.question for t in self.tests):
            got, of = self.question_score(q)
            lines.append(f"{q}: {_num(got)} / {_num(of)}")
            for t in (t for t in self.tests if t.question == q):
                mark = "pass" if t.passed else "FAIL"
                kind = "hidden" if t.hidden else "public"
                lines.append(f"  [{mark}] {t.name} ({kind}, {_num(t.points)} pt)")
                if not t.passed:
                    for m in t.message.splitlines():
                        lines.append(f"         {m}")
        for q, pts in self.manual:
            lines.append(
                f"{q}: graded by hand ({_num(pts)} pt, not in the score below)"
            )
        if self.error:
            lines.append(f"grader error: {self.error}")
        lines.append(f"score: {_num(self.score)} / {_num(self.possible)}")
        return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


def _assignment_of(nb_path: Path) -> str:
    if not Path(nb_path).is_file():
        raise SystemExit(f"{nb_path}: no such notebook")
    meta = json.loads(Path(nb_path).read_text()).get("metadata", {})
    name = meta.get("otter", {}).get("assignment_name")
    if not name:
        raise SystemExit(
            f"{nb_path}: not an assignment notebook (no otter metadata); "
            "submit the notebook handed out, renamed if you like"
        )
    return name


def _test_names(zip_path: Path) -> dict[str, list[tuple[str, bool]]]:
    """Question -> [(test function name, hidden)] in order, read from the autograder."""
    from otter.test_files.exception_test import ExceptionTestFile

    names = {}
    with zipfile.ZipFile(zip_path) as z:
        for info in z.namelist():
            if info.startswith("tests/") and info.endswith(".py"):
                tf = ExceptionTestFile.from_string(z.read(info).decode(), path=info)
                names[tf.name] = [
                    (tc.body.test_func.__name__, tc.hidden) for tc in tf.test_cases
                ]
    return names


def _manual_questions(
    zip_path: Path, solutions: Path | None
) -> list[tuple[str, float]]:
    if solutions is None or not solutions.exists():
        return []
    out = []
    for cell in json.loads(solutions.read_text())["cells"]:
        src = "".join(cell["source"])
        if cell["cell_type"] == "raw" and "manual: true" in src:
            name = re.search(r"name:\s*(\S+)", src)
            pts = re.search(r"points:\s*([\d.]+)", src)
            out.append(
                (name.group(1) if name else "?", float(pts.group(1)) if pts else 1)
            )
    return out


def _failure_text(message: str) -> str:
    """Otter's failure text without its header: the exception's message."""
    lines = message.splitlines()
    # "❌ Test case failed" / "Error at line N in test qK:" / "  <line>" / "Exc: msg"
    body = "\n".join(lines[3:]) if len(lines) > 3 else message
    return re.sub(r"^AssertionError: ?", "", body)


def grade(nb_path: Path, kit: Path = DEFAULT_OUT) -> Report:
    """Grade one submission with Otter's local grader and the built autograder."""
    _quiet_imports()
    from otter.api import grade_submission

    nb_path = Path(nb_path).resolve()
    assignment = _assignment_of(nb_path)
    zip_path = Path(kit) / "autograder" / f"{assignment}.zip"
    if not zip_path.exists():
        raise SystemExit(
            f"no autograder for {assignment} in {kit}: run make course first"
        )
    names = _test_names(zip_path)
    manual = _manual_questions(zip_path, COURSE / f"{assignment}.ipynb")
    with tempfile.TemporaryDirectory() as tmp, _captured_fds() as log:
        # Otter grades the only notebook in the submission folder: copy it alone.
        sub = Path(tmp) / nb_path.name
        shutil.copy(nb_path, sub)
        try:
            results = grade_submission(str(sub), str(zip_path), quiet=True)
        except Exception as e:
            raise RuntimeError(
                f"the grader failed on {nb_path}: {e}\n{log.getvalue()}"
            ) from e
    tests = []
    for q in sorted(names, key=_natural):
        tf = results.results.get(q)
        for i, (fname, hidden) in enumerate(names[q]):
            if tf is None:
                tests.append(TestResult(q, fname, hidden, 1.0, False, "not run"))
                continue
            r = tf.test_case_results[i]
            pts = float(r.test_case.points or 0)
            msg = "" if r.passed else _failure_text(r.message)
            tests.append(TestResult(q, fname, hidden, pts, bool(r.passed), msg))
    return Report(assignment, tests, manual)


def grade_in_process(nb_path: Path, kit: Path = DEFAULT_OUT) -> Report:
    """The same grading as :func:`grade`, in this process, for the kit's own tests.

    Otter's grader starts a Jupyter kernel per submission (about 10 s here, most of it
    imports); the kit's check grades a dozen notebooks. This runs what Otter's
    GradingPreprocessor runs, the same way: every code cell in order in one namespace,
    errors ignored, cells tagged ``otter_ignore`` and Otter's own cells skipped, then
    Otter's test files from the autograder (``ExceptionTestFile.run``) on the final
    namespace. tests/test_course.py checks it agrees with :func:`grade` on a notebook.
    """
    import nbformat
    from otter.test_files.exception_test import ExceptionTestFile

    nb_path = Path(nb_path).resolve()
    assignment = _assignment_of(nb_path)
    zip_path = Path(kit) / "autograder" / f"{assignment}.zip"
    nb = nbformat.read(nb_path, as_version=4)
    manual = _manual_questions(zip_path, COURSE / f"{assignment}.ipynb")
    tests = []
    with tempfile.TemporaryDirectory() as tmp, _captured_fds(), contextlib.chdir(tmp):
        with zipfile.ZipFile(zip_path) as z:
            for name in z.namelist():
                if name.startswith(("files/", "tests/")):
                    z.extract(name, tmp)
        sys.path.insert(0, str(Path(tmp) / "files"))
        env: dict = {"__name__": "__main__"}
        try:
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code" or "otter_ignore" in cell.metadata.get(
                    "tags", []
                ):
                    continue
                src = cell.source
                if "otter.Notebook(" in src or src.strip().startswith("grader.check"):
                    continue
                try:
                    exec(compile(src, f"<cell {i}>", "exec"), env)
                except Exception:
                    pass  # as Otter: errors in a submission's cells are ignored
            files = sorted(
                Path(tmp, "tests").glob("*.py"), key=lambda f: _natural(f.stem)
            )
            for f in files:
                tf = ExceptionTestFile.from_file(str(f))
                tf.run(env)
                for tc, r in zip(tf.test_cases, tf.test_case_results, strict=True):
                    msg = "" if r.passed else _failure_text(r.message)
                    tests.append(
                        TestResult(
                            tf.name,
                            tc.body.test_func.__name__,
                            tc.hidden,
                            float(tc.points or 0),
                            bool(r.passed),
                            msg,
                        )
                    )
        finally:
            sys.path.remove(str(Path(tmp) / "files"))
            sys.modules.pop("bn_feedback", None)
    return Report(assignment, tests, manual)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build student notebooks and the autograders")
    b.add_argument("out", nargs="?", default=str(DEFAULT_OUT))
    b.add_argument(
        "--run-tests",
        action="store_true",
        help="let otter assign also run the tests on the solutions",
    )
    g = sub.add_parser("grade", help="grade one submitted notebook")
    g.add_argument("notebook")
    g.add_argument("kit", nargs="?", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if args.cmd == "build":
        out = build(Path(args.out), run_tests=args.run_tests)
        for f in sorted(out.rglob("*")):
            if f.is_file():
                print(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f)
        return 0
    report = grade(Path(args.notebook), Path(args.kit))
    print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
