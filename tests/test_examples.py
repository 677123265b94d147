"""Every script in examples/ runs to completion (each asserts its own outcome) and stays short."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_there_is_one_example_per_technique():
    assert [p.name[:2] for p in EXAMPLES] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    assert len(script.read_text().splitlines()) <= 60, f"{script.name} should stay within 60 lines"
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
