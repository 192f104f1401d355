"""Every usage error exits 2 with a short message and no traceback; help and version exit 0 (a CI contract).

These run the installed entry point in a fresh process, as Make targets and CI jobs do, so that a change in
the CLI library (typer vendors its own click since 0.29) is caught here and not by users.
"""

from __future__ import annotations

import pytest

from pipeline.cli import run
from tests.conftest import REPO, run_cli

DEMO = str(REPO / "configs" / "demo.yaml")

USAGE_ERRORS = {
    "no command": ([], "Usage: compress"),
    "missing CONFIG": (["pipeline"], "Missing argument 'CONFIG'"),
    "misspelt command": (["pipline", DEMO], "No such command 'pipline'"),
    "unknown option": (["pipeline", DEMO, "--epochs", "3"], "No such option: --epochs"),
    "validate without arguments": (["validate"], "Missing argument 'ARTIFACT'"),
    "unknown export format": (["export", "RUN", "--format", "trt"], "Did you mean 'tensorrt'"),
    "option without its value": (["pipeline", DEMO, "--run-dir"], "requires an argument"),
    "unknown runtime": (["validate", "m.onnx", "--config", DEMO, "--runtime", "tensorrtt"], "Did you mean"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2_without_a_traceback(case: str):
    args, expected = USAGE_ERRORS[case]
    done = run_cli(*args, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out and "File \"" not in out, out
    assert expected in " ".join(out.split()), out


def test_help_and_version_exit_0_from_the_entry_point():
    for args in (["pipeline", DEMO, "-h"], ["--version"]):
        done = run_cli(*args, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stderr


@pytest.mark.parametrize("args", [["pipeline", "--help"], ["-h"], ["validate", "-h"], ["export", "-h"],
                                  ["init", "-h"], ["report", "-h"], ["stages"], ["criteria"]])
def test_help_exits_0(args: list[str], capsys):
    assert run(args) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and out.out


def _help(args: list[str], capsys) -> str:
    run(args)
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_the_stages_and_allowed_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = _help(["pipeline", "-h"], capsys)
    assert "load -> [train] -> calibrate -> filter_prune -> layer_truncate -> finetune -> export -> validate" in text
    assert "load | train | calibrate | filter_prune | layer_truncate | finetune | export | validate" in text
    assert "finetune.max_epochs=2" in text and "Examples" in text
    assert "onnx | tensorrt" in _help(["export", "-h"], capsys)
    assert "onnxruntime-cpu | onnxruntime-cuda | tensorrt" in _help(["validate", "-h"], capsys)


def test_help_examples_are_valid_invocations(tmp_path):
    """The --set example in the help is a real key (it once was not)."""
    from pipeline.config import load_config

    load_config(REPO / "configs" / "demo.yaml", ["finetune.max_epochs=2"])


def test_the_typer_range_is_bounded():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    typer = next(d for d in deps if d.startswith("typer"))
    assert "<" in typer, f"typer must have an upper bound: {typer}"


def test_help_and_version_import_nothing_heavy():
    """`compress --help`, every verb's -h and --version answer without importing torch or the runtimes (a fresh
    interpreter: what a user's shell pays)."""
    import subprocess
    import sys

    code = ("import io, contextlib, sys\n"
            "from pipeline.cli import app, run\n"
            "verbs = [c.name or c.callback.__name__ for c in app.registered_commands]\n"
            "for args in [['--help'], ['--version'], *[[v, '-h'] for v in verbs]]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert run(args) == 0, args\n"
            "heavy = ('torch', 'timm', 'onnx', 'onnxruntime', 'torch_pruning', 'matplotlib', 'numpy')\n"
            "print(sorted(m for m in heavy if m in sys.modules), len(verbs))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == "[]", out.stdout


def test_flags_show_no_value_placeholder(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for verb in ("pipeline", "init", "validate", "export", "report", "inspect"):
        assert run([verb, "-h"]) == 0
        text = capsys.readouterr().out
        assert "<bool>" not in text and "list[str]" not in text, verb
