"""What the commands write: ``--out`` is checked before the checkpoint is loaded, ``evaluate`` keeps existing
outputs unless told to replace them, and a full disk or a kill while an output is written keeps the previous one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.evaluation.scoring import load_samples_npz
from maskdiff.files import WriteError
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main
from tests.faults import fill_disk_after, leftovers
from tests.helpers import CONFIGS, ROOT

TINY_DIT = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
            "num_classes": 10}
QUIET_EVALUATE = ["--num_samples", "4", "--batch_size", "4", "--steps", "2", "--fid", "false", "--isc", "false",
                  "--prc", "false", "--device", "cpu", "--weights", "raw"]


@pytest.fixture
def ckpt(tmp_path):
    """An untrained one-block DiT of the 8x8 digits, written as a maskdiff checkpoint."""
    torch.manual_seed(0)
    backbone = {"class_path": "maskdiff.backbones.DiT", "init_args": TINY_DIT}
    return write_method_checkpoint(tmp_path / "dit.ckpt", "maskdiff.methods.DiT", {"backbone": backbone, "clip_x0": 1.0},
                                   DiT(backbone=DiTBackbone(**TINY_DIT), clip_x0=1.0).state_dict())


def blocked(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a regular file")
    return blocker / "out"


COMMANDS = {
    "sample": lambda ckpt, out: ["sample", "--ckpt", ckpt, "--out", f"{out}/grid.png"],
    "inpaint": lambda ckpt, out: ["inpaint", "--ckpt", ckpt, "--image", "digits:0", "--out", f"{out}/panel.png"],
    "evaluate": lambda ckpt, out: ["evaluate", "--ckpt", ckpt, *QUIET_EVALUATE, "--out", str(out)],
    "probe": lambda ckpt, out: ["probe", "--ckpt", ckpt, "--data", str(CONFIGS / "quickstart.yaml"),
                                "--out", f"{out}/probe.json"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unwritable_out_stops_the_command_before_the_checkpoint_is_loaded(command, ckpt, tmp_path, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(f"maskdiff.tools.{command}.load_method", too_late)
    out = blocked(tmp_path)
    with pytest.raises(WriteError, match=rf" {out} is not writable: Not a directory$"):
        main(COMMANDS[command](str(ckpt), out))


def test_evaluate_keeps_existing_outputs_unless_told_to_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--out", str(out)])
    first = (out / "samples.npz").read_bytes()
    with pytest.raises(FileExistsError, match=rf"^{out / 'samples.npz'} exists; pass --overwrite true to replace it"):
        main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--seed", "1", "--out", str(out)])
    assert (out / "samples.npz").read_bytes() == first
    main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--seed", "1", "--out", str(out), "--overwrite", "true"])
    assert (out / "samples.npz").read_bytes() != first
    assert sorted(os.listdir(out)) == ["preview.png", "samples.json", "samples.npz"]


def test_a_full_disk_while_evaluate_writes_keeps_the_previous_samples(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--out", str(out)])
    first = (out / "samples.npz").read_bytes()
    failed = fill_disk_after(monkeypatch, limit=200, target="samples.npz")
    with pytest.raises(WriteError, match=rf"^cannot write {out / 'samples.npz'}: No space left on device \(.* free"):
        main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--seed", "1", "--out", str(out), "--overwrite", "true"])
    assert failed and (out / "samples.npz").read_bytes() == first
    assert load_samples_npz(out / "samples.npz").shape == (4, 8, 8, 3) and leftovers(out) == []


def test_a_full_disk_while_sample_writes_keeps_the_previous_grid(ckpt, tmp_path, monkeypatch):
    grid = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(ckpt), "--out", str(grid), "--per_class", "1", "--steps", "2"])
    first = grid.read_bytes()
    fill_disk_after(monkeypatch, limit=50, target="grid.png")
    with pytest.raises(WriteError, match="No space left on device"):
        main(["sample", "--ckpt", str(ckpt), "--out", str(grid), "--per_class", "1", "--steps", "2", "--seed", "1"])
    assert grid.read_bytes() == first and leftovers(tmp_path) == []


KILLED_EVALUATE = textwrap.dedent("""
    import sys, time
    from maskdiff import files
    from maskdiff.tools.main import main
    real_open = open
    class Slow:
        def __init__(self, handle): self.handle = handle
        def write(self, data):
            print("writing", flush=True)
            time.sleep(0.5)
            return self.handle.write(data)
        def __getattr__(self, name): return getattr(self.handle, name)
        def __enter__(self): return self
        def __exit__(self, *exc): self.handle.close()
    files.open = lambda path, mode="r", *a, **k: Slow(real_open(path, mode, *a, **k))
    main(sys.argv[1:])
""")


def test_evaluate_killed_while_writing_keeps_the_previous_samples(ckpt, tmp_path):
    out = tmp_path / "eval"
    main(["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--out", str(out)])
    first = (out / "samples.npz").read_bytes()
    command = ["evaluate", "--ckpt", str(ckpt), *QUIET_EVALUATE, "--seed", "1", "--out", str(out), "--overwrite", "true"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    evaluation = subprocess.Popen([sys.executable, "-c", KILLED_EVALUATE, *command], stdout=subprocess.PIPE,
                                  text=True, env=env)
    try:
        for _ in range(2):
            assert evaluation.stdout.readline() == "writing\n"
    finally:
        os.kill(evaluation.pid, signal.SIGKILL)
        evaluation.wait()
    assert [name.startswith(".samples.npz.") for name in leftovers(out)] == [True]  # killed in the middle of it
    assert (out / "samples.npz").read_bytes() == first
    assert np.array_equal(load_samples_npz(out / "samples.npz"), np.load(out / "samples.npz")["arr_0"])
