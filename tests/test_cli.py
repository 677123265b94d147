import pytest
import torch

from layerwise.cli import main


def test_demo_runs_end_to_end_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--seed", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "Weight sharing" in report and "❌" not in report
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "lstm1.weight_ih_l0" in printed and "checks passed" in printed


def test_demo_is_deterministic_with_a_seed(tmp_path):
    for name in ("a", "b"):
        assert main(["demo", "--out", str(tmp_path / name), "--epochs", "1", "--seed", "7", "--quiet"]) == 0
    assert (tmp_path / "a" / "report.md").read_text() == (tmp_path / "b" / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_demo_on_missing_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "cuda"])
    assert e.value.code == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_bad_epochs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--epochs", "0"])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err
