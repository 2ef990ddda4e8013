"""The docs' "Testing your code" page (docs/concepts/testing.md): its code blocks, in order, form a test file
that must pass as written.

The file is run by pytest in a fresh interpreter from an empty folder, as a user would run it, so the
page cannot drift from the API.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "concepts" / "testing.md"
TITLE = "# Testing your code"


def readme_test_file() -> str:
    text = PAGE.read_text(encoding="utf-8")
    assert text.startswith(TITLE), f"{PAGE} lost its {TITLE!r} title"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, f"no python code blocks in {PAGE}"
    assert "not-run:" not in text, "every block of the testing page is part of the test file: none may be skipped"
    return "\n\n".join(blocks)


def test_the_readme_layout_covers_the_recommended_kinds_of_test():
    code = readme_test_file()
    compile(code, str(PAGE), "exec")
    for needle in ("run_distributed(", "@require_distributed", "ckpt_path=", "assert_checkpoints_equal(",
                   "accumulate_grad_batches=", "BoringModule()"):
        assert needle in code, f"the docs' testing example no longer shows {needle}"


@pytest.mark.distributed  # its multi-process example starts a 2-process job
def test_the_readme_testing_example_passes_as_written(tmp_path):
    code = readme_test_file()
    (tmp_path / "test_regressor.py").write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KILN_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "PYTEST_"))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_regressor.py"],
                            cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    tests = len(re.findall(r"^def test_", code, flags=re.MULTILINE))
    assert result.returncode == 0, output[-6000:]
    assert f"{tests} passed" in output, output[-3000:]
