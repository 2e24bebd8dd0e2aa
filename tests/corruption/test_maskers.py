"""Maskers: the pattern of hidden tokens as a component; random and tube keep the historical draws exactly."""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from maskdiff.corruption import BlockMasker, MaskedNoise, RandomMasker, TokenMasking, TubeMasker, UnifiedMaskedNoise
from maskdiff.corruption.masking import random_masking, tube_masking
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from tests.helpers import CONFIGS, config_in, single_thread


def neighbour_share(mask: torch.Tensor) -> float:
    """Mean share of the 4-neighbours of hidden cells that are hidden too, over ``(B, H, W)`` masks."""
    padded = torch.nn.functional.pad(mask.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    inside = torch.nn.functional.pad(torch.ones_like(mask, dtype=torch.float), (1, 1, 1, 1))
    counts = inside[:, :-2, 1:-1] + inside[:, 2:, 1:-1] + inside[:, 1:-1, :-2] + inside[:, 1:-1, 2:]
    return float((neighbours / counts)[mask].mean())


def test_random_and_tube_maskers_draw_what_the_functions_drew():
    a = RandomMasker().mask(4, (4, 4), 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 16, 0.75, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    a = TubeMasker().mask(2, (2, 4, 4), 0.5, generator=torch.Generator().manual_seed(3))
    b = tube_masking(2, (2, 4, 4), 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_restore, b.ids_restore)
    with pytest.raises(ValueError, match=r"TubeMasker needs a video token grid \(t, h, w\)"):
        TubeMasker().mask(1, (4, 4), 0.5)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_block_masker_hides_a_fixed_count_in_blocks(ratio):
    generator = torch.Generator().manual_seed(0)
    masking = BlockMasker(min_block=4).mask(64, (8, 8), ratio, generator=generator)
    hidden = 64 - int(64 * (1 - ratio))
    assert (masking.mask.sum(1) == hidden).all()
    assert masking.ids_keep.shape == (64, 64 - hidden)
    assert not masking.mask.gather(1, masking.ids_keep).any()
    shuffle = torch.argsort(masking.ids_restore, dim=1)
    assert torch.equal(masking.mask.gather(1, shuffle)[:, : 64 - hidden], torch.zeros(64, 64 - hidden, dtype=torch.bool))
    random = RandomMasker().mask(64, (8, 8), ratio, generator=torch.Generator().manual_seed(0))
    assert neighbour_share(masking.mask.view(64, 8, 8)) > neighbour_share(random.mask.view(64, 8, 8)) + 0.1


def test_block_masker_is_seeded_and_repeats_its_blocks_in_every_frame():
    first = BlockMasker().mask(3, (8, 8), 0.5, generator=torch.Generator().manual_seed(5))
    again = BlockMasker().mask(3, (8, 8), 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask, again.mask) and torch.equal(first.ids_keep, again.ids_keep)
    clip = BlockMasker().mask(2, (3, 4, 4), 0.5, generator=torch.Generator().manual_seed(1)).mask.view(2, 3, 16)
    assert (clip == clip[:, :1]).all() and (clip.sum(-1) == 8).all()


def test_block_masker_arguments_are_checked():
    for bad in ({"min_block": 0}, {"min_aspect": 0.0}, {"min_aspect": 1.5}, {"max_tries": 0}):
        with pytest.raises(ValueError):
            BlockMasker(**bad)
    with pytest.raises(ValueError, match="either masker"):
        TokenMasking(0.5, tube=True, masker=BlockMasker())


@pytest.mark.parametrize("corruption", [TokenMasking(0.5, masker=BlockMasker()), MaskedNoise(0.5, masker=BlockMasker()),
                                        UnifiedMaskedNoise(masker=BlockMasker())])
def test_every_masking_corruption_takes_a_masker(corruption):
    torch.manual_seed(0)
    views = corruption(torch.randn(4, 16, 3), (4, 4))
    masked = [view for view in views if view.masking is not None]
    assert masked and all(isinstance(c, BlockMasker) for c in [corruption.masker])
    for view in masked:
        counts = view.masking.mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mae/mae_digits.yaml", "mdt/mdt_digits.yaml"])
def test_mae_and_mdt_train_with_the_block_masker_through_the_cli(tmp_path, digits_cache, config):
    path, ckpt_dir = config_in(tmp_path, CONFIGS / config, grid={"per_class": 1})
    settings = yaml.safe_load(path.read_text())
    settings["trainer"]["callbacks"] = [c for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    settings["model"]["init_args"]["corruption"]["init_args"]["masker"] = {
        "class_path": "maskdiff.corruption.BlockMasker", "init_args": {"min_block": 2}}
    path.write_text(yaml.safe_dump(settings))
    with single_thread():
        main(["fit", "--config", str(path), "--trainer.max_steps", "30", "--trainer.log_every_n_steps", "5",
              "--trainer.limit_val_batches", "0"])
    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) >= 5 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    method = load_method(ckpt_dir / "last.ckpt")
    assert isinstance(method.corruption.masker, BlockMasker) and method.corruption.masker.min_block == 2
