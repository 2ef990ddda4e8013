"""Every fenced ``python`` block in docs/**/*.md and README.md runs: a page's blocks, in order, form one script
run by a fresh interpreter in an empty folder, as a reader would paste them. A block that cannot run here is
marked right before it with ``<!-- not-run: <reason> -->``; only that marker skips a block, and it needs a reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"(?:<!--\s*not-run:(?P<reason>[^>]*?)-->\s*\n)?```python\n(?P<code>.*?)```", re.DOTALL)


def page_blocks(text: str) -> tuple[list[str], list[str]]:
    """(blocks to run, reasons of the skipped ones) of one markdown page, in order."""
    run, skipped = [], []
    for match in BLOCK.finditer(text):
        if match.group("reason") is None:
            run.append(match.group("code"))
        else:
            skipped.append(match.group("reason").strip())
    return run, skipped


def test_the_marker_is_the_only_way_to_skip_a_block():
    run, skipped = page_blocks("<!-- not-run: needs 4 processes -->\n```python\na = 1\n```\n\n```python\nb = 2\n```\n")
    assert run == ["b = 2\n"] and skipped == ["needs 4 processes"]
    run, skipped = page_blocks("<!-- some other comment -->\n```python\nc = 3\n```\n")
    assert run == ["c = 3\n"] and skipped == []


def test_every_not_run_marker_gives_a_reason():
    for page in PAGES:
        _, skipped = page_blocks(page.read_text(encoding="utf-8"))
        assert all(skipped), f"{page.name}: a not-run marker without a reason"


RUNNABLE = [page for page in PAGES if page_blocks(page.read_text(encoding="utf-8"))[0]]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_python_blocks_of_a_docs_page_run(page, tmp_path):
    run, _ = page_blocks(page.read_text(encoding="utf-8"))
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(run), encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KILN_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "PYTEST_"))}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


def test_every_api_reference_names_a_module_that_exists():
    """`::: module` lines in docs/api/*.md: a moved or renamed module fails here, not only in `nox -s docs`."""
    import importlib.util

    names = [line[4:].strip() for page in sorted((ROOT / "docs" / "api").glob("*.md"))
             for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("::: ")]
    assert names, "docs/api has no ::: references"
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    assert not missing, f"docs/api references modules that do not exist (moved? update docs/api/*.md): {missing}"


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "internals.md"], ids=lambda p: p.name)
def test_the_layout_pages_name_files_and_folders_that_exist(page):
    """The folder trees and step walks of "How Kiln is built": every path they name is in the repository."""
    import re

    text = page.read_text(encoding="utf-8")
    if page.name == "README.md":
        text = text.split("## How Kiln is built", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:framework|callbacks|strategies|benchmarks)/[\w/.]*)`", text))
    tree = [line for line in text.split("```", 2)[1].splitlines() if line.strip()]
    top = [line.split()[0] for line in tree if not line.startswith(" ")]
    assert top == ["framework/", "callbacks/", "strategies/"]
    parent = ""
    for line in tree:
        entry = line.split()[0]
        if not line.startswith(" "):
            parent = entry
        elif entry.endswith("/") or entry.endswith(".py"):
            named.add(parent + entry)
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert named and not missing, f"{page.name} names paths that do not exist: {missing}"
