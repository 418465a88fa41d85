"""The documentation builds and what it shows exists.

- ``mkdocs build --strict`` (``mkdocs.yml``): a broken link or anchor between pages, or a page left out of the
  nav, fails the build.
- Every ```python block of README.md and docs/**/*.md compiles and runs in a fresh namespace (in a scratch
  directory). A block that needs a Trainer run on real models, downloads, a GPU or the offline assets is marked
  with ``<!-- docs-test: imports-only -->`` on the line before it: it still compiles, and its import statements
  run, so a reference to a missing name fails.
- Every ```yaml block parses; every ``configs/*.yaml``, ``benchmarks/``, ``examples/`` and ``tests/`` path the docs
  name exists; every ``lightning_peft.X.Y`` dotted name the docs write resolves (import the module part, getattr
  the rest); README's relative links point at files that exist.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
IMPORTS_ONLY = "<!-- docs-test: imports-only -->"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(path: Path) -> list[tuple[str, int, str, bool]]:
    """``(language, first line number, source, imports_only)`` of every fenced block in ``path``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        assert end < len(lines), f"{_rel(path)}:{i + 1}: unclosed code block"
        source = textwrap.dedent("\n".join(lines[i + 1 : end]))
        blocks.append((start.group(2).lower(), i + 2, source, previous == IMPORTS_ONLY))
        i = end + 1
    return blocks


def _blocks(language: str) -> list:
    return [
        pytest.param(path, line, source, imports_only, id=f"{_rel(path)}:{line}")
        for path in DOC_FILES
        for lang, line, source, imports_only in code_blocks(path)
        if lang == language
    ]


def _doc_text() -> str:
    return "\n".join(path.read_text() for path in DOC_FILES)


def test_site_builds_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"


def test_every_markdown_file_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "mkdocs"

    def pages(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, dict):
            return [page for value in nav.values() for page in pages(value)]
        return [page for item in nav for page in pages(item)]

    in_nav = set(pages(config["nav"]))
    on_disk = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav, (sorted(on_disk - in_nav), sorted(in_nav - on_disk))


@pytest.mark.parametrize(("path", "line", "source", "imports_only"), _blocks("python"))
def test_python_block_runs(path, line, source, imports_only, tmp_path, monkeypatch):
    where = f"{_rel(path)}:{line}"
    code = compile(source, where, "exec")
    if imports_only:
        imports = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert imports, f"{where}: an imports-only block without imports checks nothing; make it runnable"
        code = compile(ast.Module(body=imports, type_ignores=[]), where, "exec")
    monkeypatch.chdir(tmp_path)  # blocks that write (outputs/...) write here
    exec(code, {"__name__": "__docs__"})


@pytest.mark.parametrize(("path", "line", "source", "imports_only"), _blocks("yaml"))
def test_yaml_block_parses(path, line, source, imports_only):
    assert yaml.safe_load(source) is not None, f"{_rel(path)}:{line}: empty YAML block"


def test_named_repository_files_exist():
    text = _doc_text()
    named = set(re.findall(r"\b(?:configs|benchmarks|examples|tests|docs)/[\w./-]*\w\.(?:yaml|py|sh|sbatch|md)\b", text))
    named |= {f"benchmarks/{name}" for name in re.findall(r"(?<![/\w])(bench_\w+\.py)\b", text)}
    named |= {f"configs/{name}" for name in re.findall(r"(?<![/\w])(\w+\.yaml)\b", text)}
    assert any(name.startswith("configs/") for name in named)
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"the docs name files that do not exist: {missing}"


def test_readme_links_exist():
    # README.md is outside mkdocs' docs_dir, so mkdocs does not check its links.
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [target for target in targets if not re.match(r"^[a-z]+:", target)]
    assert local
    missing = [target for target in local if not (ROOT / target).exists()]
    assert not missing, missing


DOTTED = sorted(set(re.findall(r"\blightning_peft(?:\.[A-Za-z_]\w*)+", _doc_text())))


def resolve(dotted: str) -> object:
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # old import paths still resolve, with a warning
                obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue
            raise
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("dotted", DOTTED)
def test_dotted_name_resolves(dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"the docs name {dotted}, which does not resolve: {type(error).__name__}: {error}")
