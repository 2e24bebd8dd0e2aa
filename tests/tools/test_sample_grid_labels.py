"""``maskdiff sample`` labels each row of its grid with the row's class and shows 8-px digits at 64 px."""

import numpy as np
import torch
from PIL import Image

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.images import label_width
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main

TINY_DIT = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
            "num_classes": 10}


def test_sample_labels_the_rows_with_their_classes(tmp_path):
    torch.manual_seed(0)
    backbone = {"class_path": "maskdiff.backbones.DiT", "init_args": TINY_DIT}
    ckpt = write_method_checkpoint(tmp_path / "dit.ckpt", "maskdiff.methods.DiT", {"backbone": backbone, "clip_x0": 1.0},
                                   DiT(backbone=DiTBackbone(**TINY_DIT), clip_x0=1.0).state_dict())
    grid = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(ckpt), "--out", str(grid), "--classes", "[3,7,9]", "--per_class", "2", "--steps", "2"])
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    margin = label_width(["3", "7", "9"])
    assert pixels.shape == (3 * 65 + 1, margin + 2 * 65 + 1, 3)
    assert all((pixels[1 + row * 65: (row + 1) * 65, :margin] < 128).any() for row in range(3))
