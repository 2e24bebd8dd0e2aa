"""``maskdiff convert dit|mdt SRC OUT`` writes checkpoints that load, match the official forward and sample."""

import torch

from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.methods import MDT, DiT
from tests.convert.test_dit_convert import NANO, assert_matches_official, random_official_state_dict
from tests.convert.test_mdt_convert import official_state_dict, ours, ref_forward


def test_convert_dit_then_sample(tmp_path, capsys):
    state_dict = random_official_state_dict(**NANO, learn_sigma=True, seed=0)
    torch.save(state_dict, tmp_path / "DiT-official.pt")
    main(["convert", "dit", str(tmp_path / "DiT-official.pt"), str(tmp_path / "dit.ckpt")])
    module = load_method(tmp_path / "dit.ckpt")
    assert type(module) is DiT and module.ema_backbone is None
    assert module.guidance.scale == 1.5 and module.guidance.channels == 3  # DiT's FID setting as released
    assert_matches_official(module.backbone.eval(), state_dict, NANO)
    main(["sample", "--ckpt", str(tmp_path / "dit.ckpt"), "--out", str(tmp_path / "grid.png"), "--sampler", "ddim",
          "--steps", "3", "--classes", "[0,1]", "--per_class", "2", "--weights", "raw"])
    assert "cfg 1.5 (constant)" in capsys.readouterr().out and (tmp_path / "grid.png").is_file()


def test_convert_mdt_then_sample(tmp_path, capsys):
    state_dict = official_state_dict(2, 4, 2)
    torch.save(state_dict, tmp_path / "mdt-official.pt")
    main(["convert", "mdt", str(tmp_path / "mdt-official.pt"), str(tmp_path / "mdt.ckpt")])
    module = load_method(tmp_path / "mdt.ckpt")
    assert type(module) is MDT and type(module.backbone).__name__ == "MDTv2"
    image = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([3, 800]), torch.tensor([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(ours(module.backbone.eval(), image, t, y), ref_forward(state_dict, 2, 4, 2, image, t, y),
                                   rtol=1e-5, atol=1e-5)
    main(["sample", "--ckpt", str(tmp_path / "mdt.ckpt"), "--out", str(tmp_path / "grid.png"), "--sampler", "ddim",
          "--steps", "3", "--classes", "[0,1]", "--per_class", "1"])
    assert "cfg 3.8 (power_cosine)" in capsys.readouterr().out
