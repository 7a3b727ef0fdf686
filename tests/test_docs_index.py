"""The docs point at real code: every path exists, every `path :: name` is defined there,
every `tests/x.py::test_name` is a test, every command names a real script, module and
flags, and every relative link (and its #anchor) resolves.

docs/lectures.md (the index of the lectures' concepts) is checked strictly; the other
docs/*.md and README.md get the same checks. Parsing only (ast, no imports of the code
under test), except `python -m tinymoe ...` commands, whose arguments go through the real
argparse parser. The whole file runs in about a second.
"""
import ast
import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
TOP = ("tinymoe/", "tests/", "examples/", "benchmarks/", "docs/")
PLACEHOLDERS = ("FILE", "file ::", "_X.py", "...", "<", "*", "{")

SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"[\w./-]+\.(?:py|md|cu|png|toml|txt)\b|[\w./-]+/")
REF = re.compile(r"^(?P<path>[\w./-]*\.py)?\s*::\s*(?P<names>.+)$")


# --------------------------------------------------------------------------- the repository

@functools.lru_cache(maxsize=None)
def repo_files():
    skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "runs"}
    return [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
            if not skip.intersection(p.relative_to(ROOT).parts)]


def resolve(path):
    """Repository files that `path` may name: from the root, or a unique-enough suffix
    (`nn/moe/routers.py` in docs that speak from inside tinymoe/)."""
    path = path.rstrip("/")
    return [f for f in repo_files() if f == path or f.endswith("/" + path)]


@functools.lru_cache(maxsize=None)
def defined_names(path):
    """Names a Python file defines: module-level functions, classes, assignments and
    imports, plus `Class.member` for methods, class attributes and `self.x = ...`."""
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        if isinstance(node, ast.ClassDef):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{sub.name}")
                elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                    names.add(f"{node.name}.{sub.id}")
                elif (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                      and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                    names.add(f"{node.name}.{sub.attr}")
    return names


def rel(path):
    """A path as the docs write it: from the repository root where it lies inside."""
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    anchors = set()
    for line in (ROOT / path).read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            text = re.sub(r"[^\w\- ]", "", text)
            anchors.add(text.replace(" ", "-"))
    return anchors


# --------------------------------------------------------------------------- the checks

def check_ref(span, last_file):
    """`path :: a, B.c` or `path::test_x`, or `::test_y` (path: the line's last file).
    Returns (problems, the file used)."""
    m = REF.match(span)
    path = m["path"] or last_file
    if path is None:
        return [f"`{span}`: `::name` with no file before it on the line"], None
    files = [f for f in resolve(path) if f.endswith(".py")]
    if not files:
        return [f"`{span}`: no file {path}"], path
    problems, owner = [], None
    for name in re.sub(r"\(.*?\)|\[.*?\]", "", m["names"]).split(","):  # f(arg=), test[id]
        name = name.strip()
        known = set().union(*(defined_names(f) for f in files))
        if "." in name:
            owner = name.split(".")[0]          # `Class.a, b`: b may be Class.b
        if name not in known and f"{owner}.{name}" not in known:
            problems.append(f"`{span}`: {name} is not defined in {' or '.join(files)}")
    return problems, path


@functools.lru_cache(maxsize=None)
def cli_parser():
    from tinymoe.cli import build_parser
    return build_parser()


def check_command(span):
    """`python script.py --flags` or `python -m module args`: the script or module exists,
    `python -m tinymoe` arguments parse, a script's --flags appear in its source."""
    try:
        words = shlex.split(span)
    except ValueError:
        return [f"`{span}`: cannot split the command"]
    if words[:3] == ["python", "-m", "pytest"] or words[1] == "-c":
        return []
    problems, scripts = [], []
    if words[1] == "-m":
        module, args = words[2], words[3:]
        base = module.replace(".", "/")
        if not ((ROOT / f"{base}.py").exists() or (ROOT / base / "__init__.py").exists()):
            return [f"`{span}`: no module {module}"]
        if module == "tinymoe":
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
                cli_parser().parse_args(args)
                return []
            return [f"`{span}`: {err.getvalue().strip().splitlines()[-1]}"]
        scripts = [w for w in args if w.endswith(".py")]
    else:
        scripts = [words[1]]
    for script in scripts:
        if not (ROOT / script).exists():
            problems.append(f"`{span}`: no script {script}")
            continue
        source = (ROOT / script).read_text()
        for flag in (w.split("=")[0] for w in words[words.index(script) + 1:]):
            if flag.startswith("--") and f'"{flag}"' not in source:
                problems.append(f"`{span}`: {script} has no option {flag}")
    return problems


def check_line(line, doc):
    problems, last_file = [], None
    for span in SPAN.findall(line):
        span = span.strip()
        if any(p in span for p in PLACEHOLDERS):
            continue
        if span.startswith("python "):
            problems += check_command(span)
        elif REF.match(span):
            found, last_file = check_ref(span, last_file)
            problems += found
        elif span.startswith(TOP) and PATH.fullmatch(span):
            if not resolve(span):
                problems.append(f"`{span}`: no such path")
            elif span.endswith(".py"):
                last_file = span
    for target in LINK.findall(line):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"link ({target}): no file {rel(file)}")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            problems.append(f"link ({target}): no heading #{anchor} in {file.name}")
    return problems


def check_doc(doc):
    problems, in_code = [], False
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            problems += [f"{rel(doc)}:{number}: {p}" for p in check_line(line, doc)]
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_doc_references_exist(doc):
    problems = check_doc(doc)
    assert not problems, "stale references:\n" + "\n".join(problems)


def test_lectures_index_has_no_missing_pieces_left_unsaid():
    """Every concept row of lectures.md fills its four cells; a gap says **missing**."""
    rows = [line for line in (ROOT / "docs/lectures.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Concept")]
    assert len(rows) > 40
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), f"lectures.md: a row without 4 filled cells: {row}"


def test_the_checker_catches_stale_rows(tmp_path):
    """A renamed function, a deleted test, a wrong flag and a dead link are each reported."""
    doc = tmp_path / "stale.md"
    doc.write_text(
        "| x | `tinymoe/nn/moe/routers.py :: TopKRouter, NoSuchRouter` "
        "| `tests/test_router.py::test_router_gradcheck`, `::test_gone` "
        "| `python -m tinymoe train --routr switch` |\n"
        "`examples/nowhere.py` `python examples/compare_routers.py --fast` [x](#nope)\n")
    problems = "\n".join(check_doc(doc))
    for needle in ("NoSuchRouter is not defined", "test_gone is not defined", "--routr",
                   "no such path", "has no option --fast", "no heading #nope"):
        assert needle in problems, problems
    assert "TopKRouter is" not in problems and "test_router_gradcheck is" not in problems
