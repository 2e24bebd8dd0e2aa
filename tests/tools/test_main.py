"""The ``maskdiff`` entry: one help line per command, and each command's example in its ``--help``."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.corruption import BlockMasker
from maskdiff.inpainting.masks import masker_mask
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main

COMMANDS = ("fit", "validate", "test", "predict", "sample", "evaluate", "inpaint", "probe", "convert", "shards",
            "preflight", "plot")
TINY_DIT = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
            "num_classes": 10}


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_help_lists_every_command_on_one_line(args, capsys):
    main(args)
    lines = capsys.readouterr().out.splitlines()
    for command in COMMANDS:
        assert sum(line.split()[:1] == [command] for line in lines) == 1, command


@pytest.mark.parametrize("command", [["sample"], ["evaluate"], ["inpaint"], ["probe"], ["convert", "dit"],
                                     ["shards", "digits"], ["plot"]])
def test_a_commands_help_shows_its_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Example: maskdiff {' '.join(command)} " in help_text


def test_block_masker_pixels_cover_whole_tokens_of_its_count():
    mask = masker_mask(BlockMasker(min_block=2), (4, 4), 0.5, token_pixels=2, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    cells = mask.view(4, 2, 4, 2).permute(0, 2, 1, 3).flatten(2)
    assert (cells.all(-1) | ~cells.any(-1)).all() and int(cells[..., 0].sum()) == 8
    clip = masker_mask(BlockMasker(min_block=2), (2, 4, 4), 0.5, token_pixels=2, tubelet=2,
                       generator=torch.Generator().manual_seed(0))
    assert clip.shape == (4, 8, 8) and all(torch.equal(frame, clip[0]) for frame in clip)


def test_inpaint_takes_a_masker_for_random_masks(tmp_path, capsys):
    torch.manual_seed(0)
    method = DiT(backbone=DiTBackbone(**TINY_DIT), clip_x0=1.0)
    backbone = {"class_path": "maskdiff.backbones.DiT", "init_args": TINY_DIT}
    ckpt = write_method_checkpoint(tmp_path / "dit.ckpt", "maskdiff.methods.DiT", {"backbone": backbone, "clip_x0": 1.0},
                                   method.state_dict())
    common = ["inpaint", "--ckpt", str(ckpt), "--image", "digits:0", "--mask_kind", "random", "--mask_ratio", "0.5",
              "--samples", "1", "--steps", "2", "--weights", "raw"]
    main([*common, "--masker", "maskdiff.corruption.BlockMasker", "--masker.init_args.min_block", "4",
          "--out", str(tmp_path / "block.png")])
    printed = capsys.readouterr().out
    assert "BlockMasker(min_block=4" in printed and "8/16 tokens generated" in printed and "ddpm-2" in printed
    greyed = np.array(Image.open(tmp_path / "block.png").convert("L"))[1:65, 66:130] == 128
    expected = masker_mask(BlockMasker(min_block=4), (4, 4), 0.5, 2, generator=torch.Generator().manual_seed(0))
    assert greyed[expected.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()].all()
    with pytest.raises(ValueError, match="--masker .* chooses the tokens of --mask_kind random"):
        main([*common[:6], "half", "--masker", "maskdiff.corruption.BlockMasker", "--out", str(tmp_path / "x.png")])
