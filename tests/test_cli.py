import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerwise as lw
from layerwise.cli import main


def test_demo_runs_end_to_end_writes_the_report_and_repeats_it_with_the_same_seed(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--seed", "1"]) == 0
    report = (out / "report.md").read_text()
    assert "Weight sharing" in report and "❌" not in report
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "lstm1.weight_ih_l0" in printed and "checks passed" in printed
    assert main(["demo", "--out", str(tmp_path / "again"), "--epochs", "1", "--seed", "1", "--quiet"]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == report  # deterministic with a seed


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


@pytest.mark.parametrize("option, value, message", [
    ("--device", "tpu", "argument --device: tpu: the demo runs on cpu or cuda"),
    ("--device", "meta", "argument --device: meta: the demo runs on cpu or cuda"),
    ("--epochs", "x", "argument --epochs: x: a whole number of epochs, at least 1"),
    ("--out", "", "argument --out: an empty path; give a folder name"),  # the report went into the current folder
    ("--out", "{tmp}/file", "argument --out: {tmp}/file: exists and is not a folder")])
def test_a_device_epochs_or_out_the_demo_cannot_use_is_a_usage_error_of_the_demo(tmp_path, capsys, monkeypatch,
                                                                                 option, value, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "report"), option, value.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: layerwise demo")
    assert f"layerwise demo: error: {message.format(tmp=tmp_path)}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.parametrize("argv, missing", [(["show"], "file"), (["diff", "a.safetensors"], "b")])
def test_a_missing_argument_is_named_alone(capsys, argv, missing):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.rstrip().endswith(f"the following arguments are required: {missing}")


# --------------------------------------------------------------------------- checkpoint commands


@pytest.fixture
def ckpts(tmp_path):
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        paths.append(tmp_path / f"m{i}.safetensors")
        lw.save(model, paths[-1])
    return paths


def test_show_lists_tensors_and_totals(ckpts, capsys):
    assert main(["show", str(ckpts[0])]) == 0
    out = capsys.readouterr().out
    assert "0.weight" in out and "float32" in out and "4×3" in out and "num_batches_tracked" in out
    assert "9 tensors, 43 elements" in out
    assert main(["show", str(ckpts[0]), "**.bias"]) == 0
    out = capsys.readouterr().out
    assert "0.bias" in out and "0.weight" not in out


def test_average_merge_and_diff_end_to_end(ckpts, tmp_path, capsys):
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(ckpts[1]), str(ckpts[2]), "-o", str(out), "--weights", "1", "3", "--quiet"]) == 0
    expected = lw.average([lw.load(ckpts[1]), lw.load(ckpts[2])], weights=[1, 3])
    assert all(torch.equal(lw.load(out)[k], v) for k, v in expected.items())

    ties = tmp_path / "ties.safetensors"
    assert main(["merge", "--method", "ties", "--base", str(ckpts[0]), str(ckpts[1]), str(ckpts[2]),
                 "-o", str(ties), "--density", "0.5", "--dtype", "bf16", "--quiet"]) == 0
    expected = lw.merge(lw.load(ckpts[0]), [lw.load(ckpts[1]), lw.load(ckpts[2])], "ties", density=0.5)
    assert torch.equal(lw.load(ties)["0.weight"], expected["0.weight"].bfloat16())

    capsys.readouterr()
    assert main(["diff", str(ckpts[1]), str(out), "0"]) == 0
    printed = capsys.readouterr().out
    assert "0.weight" in printed and "cosine" in printed and "2.weight" not in printed


def test_progress_goes_to_stderr(ckpts, tmp_path, capsys):
    assert main(["average", str(ckpts[0]), str(ckpts[1]), "-o", str(tmp_path / "a.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "bytes" in captured.err and "wrote" in captured.out


@pytest.mark.parametrize("make_bad, argv_tail, fragments", [
    (lambda p: p.write_bytes(b"12345678"), ["-o", "{out}"], ["bad.safetensors"]),
    (lambda p: lw.save({"0.weight": torch.zeros(5, 3)}, p), ["-o", "{out}"], ["bad.safetensors", "0.weight"]),
])
def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys, make_bad, argv_tail, fragments):
    bad = tmp_path / "bad.safetensors"
    make_bad(bad)
    argv = ["average", str(ckpts[0]), str(bad)] + [a.format(out=tmp_path / "o.safetensors") for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("layerwise average: error:")
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("option, message", [
    ("normalize=" + "[" * 100_000, "linear option normalize='[[["),  # past the JSON parser's depth: kept as text
    ("=3", "write NAME=VALUE"),
])
def test_a_bad_merge_option_exits_2_naming_it(ckpts, tmp_path, capsys, option, message):
    out = tmp_path / "o.safetensors"
    assert main(["merge", "--method", "linear", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--option", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerwise merge: error:") and message in err and not out.exists()


@pytest.mark.parametrize("output, message", [
    ("", "output is an empty path"),  # -o "$UNSET": not the current folder
    ("merged.pt", "output {out}: this merge writes one .safetensors file or a model folder, and 'merged.pt' would be a "
                  "folder named like a .pt file; write {stem}.safetensors or a folder name such as {stem}"),
    ("merged.bin", "'merged.bin' would be a folder named like a .bin file")])
def test_an_output_name_that_is_no_file_or_folder_it_could_be_exits_2(ckpts, tmp_path, capsys, monkeypatch, output,
                                                                     message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / output if output else ""
    assert main(["average", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--quiet", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("layerwise average: error:")
    assert message.format(out=out, stem=tmp_path / "merged") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]


@pytest.mark.parametrize("flags, message", [
    (["--method", "slerp", "--t", "0.3", "--option", "t=0.9"], "--option t=0.9: t is given twice"),
    (["--method", "linear", "--option", "normalize=true", "--option", "normalize=false"],
     "--option normalize=false: normalize is given twice"),
])
def test_an_option_given_twice_exits_2_instead_of_the_last_winning(ckpts, tmp_path, capsys, flags, message):
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--quiet", *flags]) == 2
    assert f"layerwise merge: error: {message} (--" in capsys.readouterr().err and not out.exists()


def test_existing_output_needs_force(ckpts, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main(["average", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["average", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--quiet", "--force"]) == 0
    assert "0.weight" in lw.load(out)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_wherever_it_is_given(tmp_path, where):
    argv = ["show", str(tmp_path / "missing.safetensors")]
    with pytest.raises(lw.CheckpointNotFoundError):
        main(["--debug", *argv] if where == "before" else [*argv, "--debug"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"layerwise {lw.__version__}"


def test_help_of_every_command_imports_neither_torch_nor_rich():
    from layerwise.cli import _parser

    commands = [[]] + [[c] for c in _parser()._subparsers._group_actions[0].choices]
    code = ("import sys, contextlib, io\nfrom layerwise.cli import main\n"
            f"for argv in {commands!r}:\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main([*argv, '--help'])\n"
            "print(sorted(m for m in ('torch', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_option_with_a_default_shows_it_in_help():
    from layerwise.cli import _parser

    for name, command in _parser()._subparsers._group_actions[0].choices.items():
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and action.default not in (None, False, "==SUPPRESS=="):
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


@pytest.mark.parametrize("raised, code, fragments", [
    (ZeroDivisionError("division by zero"), 1, ["unexpected ZeroDivisionError", "run with --debug for the traceback"]),
    (PermissionError(13, "Permission denied", "m.safetensors"), 2, ["Permission denied", "m.safetensors"]),
    (lw.CheckpointError("m.safetensors: corrupt header: tensor 'w' has shape [-1]"), 2, ["tensor 'w'"]),
    (lw.VerificationError("a check failed"), 1, ["a check failed"]),
    (KeyboardInterrupt(), 130, ["interrupted"]),
])
def test_exit_codes_follow_the_type_of_the_error_with_one_line(monkeypatch, ckpts, capsys, raised, code, fragments):
    import layerwise.checkpoint

    def fail(*args, **kwargs):
        raise raised
    monkeypatch.setattr(layerwise.checkpoint, "describe_file", fail)
    assert main(["show", str(ckpts[0])]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err


def test_the_console_script(ckpts):
    script = Path(sys.executable).parent / "layerwise"
    ok = subprocess.run([str(script), "show", str(ckpts[0])], capture_output=True, text=True)
    assert ok.returncode == 0 and "0.weight" in ok.stdout
    bad = subprocess.run([str(script), "show", str(ckpts[0].with_name("nope.safetensors"))], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.safetensors" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_mid_write_exits_130_with_one_line_and_no_temporaries(ckpts, tmp_path):
    out = tmp_path / "avg.safetensors"
    code = ("import os, signal, sys\n"
            "import layerwise._write as w\n"
            "real = w.header_bytes\n"
            "def interrupted(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(*a, **k)\n"
            "w.header_bytes = interrupted\n"
            "from layerwise.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    run = subprocess.run([sys.executable, "-c", code, "average", str(ckpts[0]), str(ckpts[1]), "-o", str(out),
                          "--quiet"], capture_output=True, text=True)
    assert run.returncode == 130, run.stderr
    assert run.stderr.strip() == "layerwise average: interrupted; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
