"""A user's mistake reaches the user as one line: ``maskdiff: error: <message>`` (and at most one ``hint:`` line) on
stderr, exit code 2, no traceback; ``MASKDIFF_DEBUG=1`` shows the traceback, and a bug always does."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from jsonargparse import ArgumentError

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.errors import UserError
from maskdiff.files import WriteError
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools import main as entry
from tests.helpers import ROOT, config_in

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2}
BACKBONE = "--model.init_args.backbone.init_args."


def tiny_checkpoint(path, num_classes: int):
    torch.manual_seed(0)
    method = DiT(backbone=DiTBackbone(**TINY, num_classes=num_classes), ema_decay=None)
    init_args = {"backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": {**TINY, "num_classes": num_classes}},
                 "ema_decay": None}
    return str(write_method_checkpoint(path, "maskdiff.methods.DiT", init_args, method.state_dict()))


def bad_commands(tmp_path) -> dict[str, tuple[list[str], str]]:
    """A dozen representative bad command lines (a config file, parse errors, config values, data against the
    model, checkpoints, arguments), each with what its error line must say."""
    config = str(config_in(tmp_path)[0])
    conditional = tiny_checkpoint(tmp_path / "dit.ckpt", 10)
    unconditional = tiny_checkpoint(tmp_path / "unconditional.ckpt", 0)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(open(conditional, "rb").read()[:2000])
    out = str(tmp_path / "grid.png")
    fit = ["fit", "--config", config]
    return {
        "empty config": (["fit", "--config", str(tmp_path / "empty.yaml")], "empty.yaml is empty"),
        "unknown option": ([*fit, "--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
        "bad option type": ([*fit, f"{BACKBONE}depth", "two"],
                            "model.init_args.backbone.init_args.depth: Expected a <class 'int'>. Got value: two"),
        "patch": ([*fit, f"{BACKBONE}input_size", "9"], "input size 9 is not divisible by patch size 2"),
        "ema_decay": ([*fit, "--model.init_args.ema_decay", "1.5"], "ema_decay 1.5 is outside [0, 1)"),
        "batch_size": ([*fit, "--data.init_args.batch_size", "0"], "batch_size must be a positive integer, got 0"),
        "data size": ([*fit, "--data.init_args.image_size", "16"], "but the backbone expects input_size 8"),
        "empty ckpt_path": ([*fit, "--ckpt_path", str(tmp_path / "empty.ckpt")], "the file is empty (0 bytes)"),
        "weights-only ckpt_path": ([*fit, "--ckpt_path", conditional], "holds weights only, no training state"),
        "truncated ckpt": (["sample", "--ckpt", str(tmp_path / "truncated.ckpt"), "--out", out],
                           "are not a complete torch archive"),
        "null class": (["sample", "--ckpt", conditional, "--classes", "[10]", "--out", out],
                       "--classes [10] outside [0, 10)"),
        "guidance": (["sample", "--ckpt", unconditional, "--cfg_scale", "2", "--out", out],
                     "needs a class-conditional model"),
    }


def run_command(args: list[str], cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskdiff.tools.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.slow
def test_bad_commands_print_one_line_exit_2_and_no_traceback_unless_debugging(tmp_path, digits_cache):
    commands = bad_commands(tmp_path)
    debug = (["sample", "--ckpt", str(tmp_path / "empty.ckpt")], {"MASKDIFF_DEBUG": "1"})
    runs = [(args, {}) for args, _ in commands.values()] + [debug]
    with ThreadPoolExecutor(4) as pool:
        *results, debugged = pool.map(lambda run: run_command(run[0], tmp_path, **run[1]), runs)
    for name, result in zip(commands, results):
        errors = [line for line in result.stderr.splitlines() if line.startswith("maskdiff: error: ")]
        hints = [line for line in result.stderr.splitlines() if line.startswith("hint: ")]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert len(errors) == 1 and len(hints) <= 1, (name, result.stderr)
        assert result.stderr.rstrip().splitlines()[-1 - len(hints)] == errors[0], (name, result.stderr)
        assert commands[name][1] in errors[0], (name, errors[0])
    assert debugged.returncode == 1 and "maskdiff: error:" not in debugged.stderr
    assert "Traceback (most recent call last)" in debugged.stderr and "CheckpointError: cannot read" in debugged.stderr


# ---------------------------------------------------------------------------------------------- in process
def main_with(monkeypatch, error: BaseException, *argv: str) -> None:
    def fail(argv=None, exit_on_error=True):
        raise error

    monkeypatch.setattr(sys, "argv", ["maskdiff", *argv])
    monkeypatch.setattr(entry, "run", fail)
    entry.main()


def test_a_user_error_exits_2_with_its_line_and_hint(monkeypatch, capsys):
    monkeypatch.delenv("MASKDIFF_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main_with(monkeypatch, UserError("the thing\nis wrong", hint="do it right"), "sample")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "maskdiff: error: the thing is wrong\nhint: do it right\n"


def test_a_bug_and_maskdiff_debug_keep_the_traceback(monkeypatch):
    monkeypatch.delenv("MASKDIFF_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="internal"):
        main_with(monkeypatch, RuntimeError("internal"), "fit")
    with pytest.raises(AssertionError):
        main_with(monkeypatch, AssertionError(), "fit")
    monkeypatch.setenv("MASKDIFF_DEBUG", "1")
    with pytest.raises(ValueError, match="a user's mistake"):
        main_with(monkeypatch, ValueError("a user's mistake"), "fit")


def wrapped(cause: BaseException) -> ValueError:
    """A constructor's error as jsonargparse reports it when it builds the config's classes."""
    try:
        raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n  - x\n"
                         "Given value type: <class 'Namespace'>\nGiven value: Namespace(...)") from cause
    except ValueError as error:
        return error


@pytest.mark.parametrize("error,lines", [
    (wrapped(ValueError("mask_ratio 1.0 is outside [0, 1)")), ["maskdiff: error: mask_ratio 1.0 is outside [0, 1)"]),
    (wrapped(RuntimeError("a bug in a constructor")), None),
    (wrapped(AssertionError()), None),
    (KeyError("state"), None),
    (OSError(28, "No space left on device writing last.ckpt (free: 0 B)"),
     ["maskdiff: error: [Errno 28] No space left on device writing last.ckpt (free: 0 B)"]),
    (OSError(5, "Input/output error"), None),
    (FloatingPointError("non-finite loss nan in optimizer step 7; stopped before the optimizer step"),
     ["maskdiff: error: non-finite loss nan in optimizer step 7; stopped before the optimizer step"]),
    (WriteError(2, "--out directory /proc/x is not writable: No such file or directory"),
     ["maskdiff: error: --out directory /proc/x is not writable: No such file or directory"]),
    (PermissionError("cannot write to /runs: permission denied"), ["maskdiff: error: cannot write to /runs: permission denied"]),
    (ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                "  File \"x.py\", line 1, in f\nValueError: shard /d/x-000.tar yields no sample"),
     ["maskdiff: error: shard /d/x-000.tar yields no sample"]),
    (ArgumentError(None, 'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
                         "[LightningModule, NoneType]\n  Errors:\n    - Problem with given class_path 'maskdiff.methods.DiT':"
                         '\n        Parser key "backbone":\n          Problem with given class_path '
                         "'maskdiff.backbones.DiT':\n            Parser key \"depth\":\n              Expected a <class "
                         "'int'>. Got value: x\n    - Expected a <class 'NoneType'>\n  Given value type: <class "
                         "'NestedArg'>\n  Given value: NestedArg(key='backbone.init_args.depth', val='x')"),
     ["maskdiff: error: model.init_args.backbone.init_args.depth: Expected a <class 'int'>. Got value: x",
      "hint: maskdiff fit --help lists its options"]),
])
def test_report_tells_a_mistake_from_a_bug(error, lines):
    assert entry.report(error, "fit") == lines


def test_a_long_message_is_cut_to_one_bounded_line():
    line = entry.report(ValueError("x" * 5000 + "\n" + "y"), "fit")[0]
    assert len(line) == len("maskdiff: error: ") + entry.MAX_MESSAGE and line.endswith("…") and "\n" not in line
