"""The demo package: out of the library's import path, its report, figures and examples."""

import doctest
import importlib
import math
import os
import pkgutil
import subprocess
import sys

import pytest
import torch
from rich.console import Console

import layerwise_demo
from layerwise_demo.report import Report, grad_norm_grid


def test_import_layerwise_never_imports_the_demo():
    code = "import layerwise, layerwise.cli, sys; print(sorted(m for m in sys.modules if 'demo' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", sorted(m.name for m in pkgutil.walk_packages(layerwise_demo.__path__,
                                                                              "layerwise_demo.")
                                        if m.name != "layerwise_demo.__main__"))
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_report_gets_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = Report(tmp_path, Console(quiet=True)).write()
    finally:
        os.umask(previous)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert path.read_text().startswith("# layerwise demo") and os.listdir(tmp_path) == ["report.md"]


def _history(layers: list[str], steps=(0, 5)) -> list[dict]:
    return [{"step": s, "layer": name, "grad_norm": float(i + 1) if name != layers[-1] or s else None}
            for s in steps for i, name in enumerate(layers)]


def test_heat_map_rows_are_tensors_up_to_30_and_modules_beyond():
    few = [f"blocks.{i}.{w}" for i in range(15) for w in ("weight", "bias")]
    rows, steps, norms = grad_norm_grid(_history(few))
    assert rows == few and steps == [0, 5] and norms[0, 0] == 1.0
    assert math.isnan(norms[-1, 0]) and norms[-1, 1] == 30.0, "no gradient: a gap, not a zero"

    many = [f"blocks.{i}.{w}" for i in range(16) for w in ("weight", "bias")]
    rows, _, norms = grad_norm_grid(_history(many))
    assert rows == [f"blocks.{i}" for i in range(16)]
    assert norms[0, 0] == pytest.approx(math.sqrt(1 ** 2 + 2 ** 2)), "the module's tensors pooled: √Σ‖g‖²"
    assert norms[-1, 0] == 31.0 and norms[-1, 1] == pytest.approx(math.sqrt(31 ** 2 + 32 ** 2))


def test_one_epoch_run_draws_runs_from_their_real_step_and_restores_threads(tmp_path):
    threads = torch.get_num_threads()
    results = layerwise_demo.run(tmp_path, epochs=1, console=Console(quiet=True))
    assert torch.get_num_threads() == threads
    base = -(-6000 // 64)  # one epoch of 6000 pairs in batches of 64
    assert results["curve_starts"] == {"base model": 0, "interleaved freeze": 2 * base, "per-layer lr": base + 1,
                                       "fine-tune a": base, "fine-tune b": base, "monitored": base}
    line = results["connectivity"]
    assert sorted(line) == [i / 10 for i in range(11)]
    assert line[0.0] == results["average_accuracies"]["model a"] and line[1.0] == results["average_accuracies"]["model b"]
    report = (tmp_path / "report.md").read_text()
    assert "get no gradient" in report and "![Test accuracy along the straight line" in report
    for figure in ("connectivity.png", "grad_norms.png", "training_curves.png"):
        assert (tmp_path / figure).read_bytes().startswith(b"\x89PNG")
