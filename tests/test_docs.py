"""The docs say only what is true of this checkout.

Every ``medvec …`` command shown in README.md or docs/*.md (in ``bash``/``console``
or unlabelled code blocks, and in inline code) names a subcommand that exists,
and ``python -m flows.cli <subcommand…> --help`` exits 0; every complete command
in a code block parses with the real parser.  Every relative link (and its
``#anchor``) resolves, every ``make`` target exists, every module path named
exists, the module map lists every module, the configuration page lists exactly
the keys of ``medvec.config.Params``, and the README stays a landing page.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REQUIRED_PAGES = (
    "hospitals",
    "operators",
    "lineage",
    "intake",
    "architecture",
    "configuration",
    "results",
    "merge_methods",
)
README_MAX_BYTES = 10_240
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# --------------------------------------------------------------------------- reading markdown


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int
    text: str
    fenced: bool  # a whole line of a shell code block (a runnable command), not inline code


def snippets(text: str, page: str = "<text>") -> list[Snippet]:
    """Lines of shell code blocks (continuations joined) and inline code spans."""
    out: list[Snippet] = []
    lang: str | None = None  # None: outside a fence
    pending, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence:
            lang = fence.group(1).lower() if lang is None else None
            continue
        if lang is not None:
            if lang in SHELL_LANGS:
                if not pending:
                    start = n
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                out.append(Snippet(page, start, pending + line, True))
                pending = ""
            continue
        out.extend(Snippet(page, n, m.group(1), False) for m in re.finditer(r"`([^`\n]+)`", line))
    return out


COMMAND = re.compile(r"^\s*(?:\$\s+)?(?:\S*/)?medvec\s+(.*)$")


def medvec_commands(text: str, page: str = "<text>") -> list[tuple[Snippet, list[str]]]:
    """(snippet, argv after ``medvec``) for every shown ``medvec …`` command."""
    found = []
    for s in snippets(text, page):
        m = COMMAND.match(s.text)
        if not m:
            continue
        try:
            argv = shlex.split(m.group(1), comments=True)
        except ValueError:
            argv = m.group(1).split("#", 1)[0].split()
        found.append((s, argv))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _placeholder(token: str) -> bool:
    return token.startswith("<") or token in ("…", "...") or token.isupper()


def subcommand_path(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(leading global options, subcommand path); raises LookupError on an unknown subcommand."""
    options, path = [], []
    node = parser
    for token in argv:
        sub = _subparsers(node)
        if sub is None:
            break
        if token.startswith("-"):
            if path:
                break
            options.append(token)
            continue
        if _placeholder(token):
            break
        if token not in sub.choices:
            raise LookupError(f"unknown subcommand {' '.join([*path, token])!r} (valid: {', '.join(sub.choices)})")
        path.append(token)
        node = sub.choices[token]
    return options, path


def parses(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """None when ``medvec argv`` parses (nothing runs), else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    return None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M)}


def links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    from flows.cli import build_parser

    return build_parser()


@pytest.fixture(scope="module")
def shown() -> list[tuple[Snippet, list[str]]]:
    return [c for page in pages() for c in medvec_commands(page.read_text(), str(page.relative_to(ROOT)))]


# --------------------------------------------------------------------------- the checker checks


def test_checker_rejects_an_unknown_subcommand(parser):
    """The checks below would catch a documented subcommand that does not exist."""
    text = "Run `medvec hospital joinx st-marys`:\n\n```bash\nmedvec vectors lst --all\n$ medvec lineage medvec@champion\n```\n"
    found = medvec_commands(text)
    assert [argv[:2] for _, argv in found] == [
        ["hospital", "joinx"],
        ["vectors", "lst"],
        ["lineage", "medvec@champion"],
    ]
    for _, argv in found[:2]:
        with pytest.raises(LookupError, match="unknown subcommand"):
            subcommand_path(argv, parser)
    assert subcommand_path(found[2][1], parser) == ([], ["lineage"])
    assert parses(["hospital", "join", "x", "--data", "d", "--nosuchflag"], parser) is not None
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "nosuchcommand", "--help"], cwd=ROOT, capture_output=True)
    assert proc.returncode != 0


def test_output_and_python_blocks_are_not_commands():
    text = "```text\nmedvec v3 @champion  merged sha256 7c1e\n```\n```python\nmedvec run\n```\n"
    assert medvec_commands(text) == []


# --------------------------------------------------------------------------- the pages


def test_required_pages_exist():
    missing = [name for name in REQUIRED_PAGES if not (DOCS / f"{name}.md").is_file()]
    assert not missing, f"docs/ lacks {missing}"


def test_readme_is_a_landing_page():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} and move detail to docs/"
    )
    linked = {Path(link.split("#")[0]).name for link in links(README.read_text())}
    unlinked = [name for name in REQUIRED_PAGES if f"{name}.md" not in linked]
    assert not unlinked, f"README.md does not link docs pages {unlinked}"


def test_docs_show_many_medvec_commands(shown):
    paths = {tuple(argv[:2]) for _, argv in shown}
    assert len(shown) >= 30 and len(paths) >= 12, f"only {len(shown)} commands found: the extraction is broken"


def test_every_shown_subcommand_exists_and_its_help_runs(shown, parser):
    problems, paths = [], {}
    for s, argv in shown:
        try:
            options, path = subcommand_path(argv, parser)
        except LookupError as exc:
            problems.append(f"{s.page}:{s.line}: `medvec {' '.join(argv)}`: {exc}")
            continue
        paths.setdefault((*options, *path), f"{s.page}:{s.line}")
    for argv, where in sorted(paths.items()):
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0 or "usage: medvec" not in proc.stdout:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            problems.append(f"{where}: `medvec {' '.join(argv)} --help` exited {proc.returncode}: {tail}")
    assert not problems, "\n".join(problems)


def test_every_command_in_a_code_block_parses(shown, parser):
    """Whole commands in shell blocks are meant to be copied: their options must exist."""
    problems = []
    for s, argv in shown:
        if s.fenced and (complaint := parses(argv, parser)) is not None:
            problems.append(f"{s.page}:{s.line}: `medvec {' '.join(argv)}`: {complaint}")
    assert not problems, "\n".join(problems)


def test_relative_links_and_anchors_resolve():
    problems = []
    for page in pages():
        for link in links(page.read_text()):
            if re.match(r"^[a-z]+:", link):
                continue
            target, _, anchor = link.partition("#")
            path = (page.parent / target).resolve() if target else page
            where = f"{page.relative_to(ROOT)}: ({link})"
            if not path.exists():
                problems.append(f"{where}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.M))
    problems = []
    for page in pages():
        for s in snippets(page.read_text(), str(page.relative_to(ROOT))):
            for target in re.findall(r"(?:^|[\s(=])make\s+([a-z][\w-]*)", s.text):
                if target not in targets:
                    problems.append(f"{s.page}:{s.line}: `make {target}` is not a Makefile target")
    assert not problems, "\n".join(problems)


def test_named_source_files_exist():
    pattern = re.compile(r"\b((?:medvec|tasks|flows|pipelines|tests|benchmarks)/[\w/]+\.(?:py|md|json))\b")
    problems = sorted(
        {
            f"{page.relative_to(ROOT)}: {name}"
            for page in pages()
            for name in pattern.findall(page.read_text())
            if not (ROOT / name).exists()
        }
    )
    assert not problems, "named but missing:\n" + "\n".join(problems)


def module_map(text: str) -> set[str]:
    """The paths the module map's tree names: a folder line (``  data/``) opens a folder at its indentation, and
    every ``name.py`` on a line, or on the lines indented under it, lies in the folder it stands in."""
    block = text.split("## Module map", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    folders: list[tuple[int, str]] = []  # (indentation, path) of the open folders
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        while folders and folders[-1][0] >= indent and not (first.endswith(".py") and folders[-1][0] < indent):
            folders.pop()
        here = folders[-1][1] if folders else ""
        if first.endswith("/"):
            here = f"{here}{first}" if not first.startswith(here) else first
            folders.append((indent, here))
        for name in re.findall(r"[\w/]+\.py\b", line):
            paths.add(name if "/" in name else f"{here}{name}")
    return paths


def test_module_map_lists_every_module():
    """docs/architecture.md's module map names every module where it lies (package and file)."""
    named = module_map((DOCS / "architecture.md").read_text())
    missing = [
        str(p.relative_to(ROOT))
        for folder in ("medvec", "tasks", "flows", "pipelines", "benchmarks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in named
    ]
    assert not missing, f"docs/architecture.md's module map does not list {missing}"


def test_the_module_map_check_reads_folders_from_the_tree():
    text = (
        "## Module map\n\n```text\nmedvec/\n  engine.py   x\n  coordinator/\n    scan.py  y\ntasks/\n  demo.py\n```\n"
    )
    assert module_map(text) == {"medvec/engine.py", "medvec/coordinator/scan.py", "tasks/demo.py"}


def test_configuration_page_lists_exactly_the_params_keys():
    from medvec.config import Params

    text = (DOCS / "configuration.md").read_text()
    documented: dict[str, set[str]] = {}
    section = None
    for line in text.splitlines():
        if m := re.match(r"^##\s+`(\w+)`", line):
            section = m.group(1)
            documented[section] = set()
        elif line.startswith("## "):
            section = None
        elif section and (m := re.match(r"^\|\s*`(\w+)`\s*\|", line)):
            documented[section].add(m.group(1))
    expected = {name: set(field.annotation.model_fields) for name, field in Params.model_fields.items()}
    assert set(documented) == set(expected), (
        f"sections: missing {set(expected) - set(documented)}, stale {set(documented) - set(expected)}"
    )
    for name, keys in expected.items():
        assert documented[name] == keys, f"{name}: missing {keys - documented[name]}, stale {documented[name] - keys}"
