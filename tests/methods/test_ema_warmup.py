"""EMA warm-up: timm's decay rule exactly, the update count saved and restored, and the young-EMA warning."""

from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3

from maskdiff.backbones import create_backbone
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import load_method
from maskdiff.methods.ema import ema_decay_at
from maskdiff.tools.main import main


def tiny_dit(**kwargs) -> DiT:
    return DiT(create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10), **kwargs)


@pytest.mark.parametrize(("decay", "power", "gamma"), [(0.995, 0.75, 1.0), (0.9999, 2 / 3, 1.0), (0.999, 1.0, 10.0)])
def test_warmup_decay_is_timms_model_ema_v3_rule(decay, power, gamma):
    timm_ema = ModelEmaV3(torch.nn.Linear(1, 1), decay=decay, use_warmup=True, warmup_power=power, warmup_gamma=gamma)
    for update in [*range(1, 60), 1000, 10_000, 10**6]:
        assert ema_decay_at(update, decay, power, gamma) == timm_ema.get_decay(update)
    assert ema_decay_at(1, decay, power, gamma) == 0.0  # the first update copies the live weights
    assert ema_decay_at(2, 0.995, 0.75) == 1 - 2 ** -0.75
    assert ema_decay_at(10**6, decay, power, gamma) == decay


def test_without_warmup_the_decay_is_constant_from_the_first_update():
    assert [ema_decay_at(update, 0.9999) for update in (1, 2, 10**6)] == [0.9999] * 3


def test_updates_follow_the_rule_and_are_counted():
    method = tiny_dit(ema_decay=0.9, ema_warmup_power=0.75)
    ema, live = method.ema_backbone.final_layer.linear.weight, method.backbone.final_layer.linear.weight
    with torch.no_grad():
        live.add_(1.0)
    method.update_ema()
    torch.testing.assert_close(ema, live, rtol=0, atol=0)
    before = ema.clone()
    with torch.no_grad():
        live.add_(1.0)
    method.update_ema()
    weight = 1 - (1 - 2 ** -0.75)
    torch.testing.assert_close(ema, before + weight * (live - before))
    assert method.ema_updates == 2


def test_the_young_ema_note(tmp_path):
    constant = tiny_dit(ema_decay=0.99)
    constant.ema_updates = 100  # 0.99 ** 100 = 37 % of the initial weights
    assert "37%" in constant.young_ema_note() and "100 updates" in constant.young_ema_note()
    constant.ema_updates = 300  # 4.9 %
    assert constant.young_ema_note() is None
    warmed = tiny_dit(ema_decay=0.99, ema_warmup_power=0.75)
    warmed.ema_updates = 3
    assert warmed.ema_start_share() == 0.0 and warmed.young_ema_note() is None
    unknown = tiny_dit(ema_decay=0.99)
    unknown.ema_updates = None
    assert unknown.young_ema_note() is None


def young_checkpoint(dit_ckpt, tmp_path, updates: int | None, warmup: float | None = None):
    checkpoint = torch.load(dit_ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["ema_warmup_power"] = warmup
    if updates is None:
        checkpoint.pop("ema_updates")
    else:
        checkpoint["ema_updates"] = updates
    path = tmp_path / "young.ckpt"
    torch.save(checkpoint, path)
    return path


def test_the_update_count_is_saved_and_restored(dit_ckpt, tmp_path):
    assert torch.load(dit_ckpt, weights_only=True)["ema_updates"] == 4  # the fixture trains 4 steps
    assert load_method(dit_ckpt).ema_updates == 4
    assert load_method(young_checkpoint(dit_ckpt, tmp_path, None)).ema_updates == 4  # older: its global_step


def test_sample_warns_once_for_a_young_ema(dit_ckpt, tmp_path, capsys):
    args = ["sample", "--out", str(tmp_path / "grid.png"), "--per_class", "1", "--sampler", "ddim", "--steps", "2"]
    main([*args, "--ckpt", str(young_checkpoint(dit_ckpt, tmp_path, 4))])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "young" in warnings[0] and "4 updates" in warnings[0] and "96%" in warnings[0]
    main([*args, "--ckpt", str(dit_ckpt)])  # warmed up: its first update copied the live weights
    assert "young" not in capsys.readouterr().err
