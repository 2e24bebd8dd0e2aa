"""UMD's recipe details as the official code computes them: the noise-free share of the global batch under data
parallelism, and the warm-up of ``optax.warmup_cosine_decay_schedule`` with big_vision's step counts."""

import math
from types import SimpleNamespace

import pytest
import torch

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.corruption import UnifiedMaskedNoise
from maskdiff.methods import UMD
from maskdiff.objectives import DualPredictionLoss


def rank_counts(global_batch: int, world_size: int, no_noise_prob: float) -> list[int]:
    """Noise-free rows each simulated rank takes from its ``global_batch / world_size`` rows."""
    counts = []
    for rank in range(world_size):
        corruption = UnifiedMaskedNoise(no_noise_prob=no_noise_prob)
        corruption.shard(rank, world_size)
        counts.append(corruption.clean_rows(global_batch // world_size))
    return counts


def test_finetune_noise_free_rows_are_int_of_the_global_batch():
    """ae_i1k fine-tune: batch 256 on 8 GPUs, no_noise_prob 0.05 -> int(256 * 0.05) = 12 rows (per GPU: 8 x 1 = 8)."""
    assert rank_counts(256, 8, 0.05) == [2, 2, 2, 2, 1, 1, 1, 1]
    assert rank_counts(256, 1, 0.05) == [12]
    assert 8 * int(32 * 0.05) == 8  # what a per-GPU split gave


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize(("global_batch", "no_noise_prob"), [(256, 0.05), (1024, 0.5), (96, 0.3), (64, 0.0), (64, 1.0)])
def test_global_count_matches_for_every_world_size(global_batch, no_noise_prob, world_size):
    counts = rank_counts(global_batch, world_size, no_noise_prob)
    assert sum(counts) == int(global_batch * no_noise_prob)
    assert max(counts) - min(counts) <= 1


def test_single_process_split_is_unchanged_and_shard_is_checked():
    corruption = UnifiedMaskedNoise(no_noise_prob=0.5)
    assert [corruption.split(batch) for batch in (10, 7, 1)] == [5, 4, 1]
    with pytest.raises(ValueError, match="rank 8 is outside the 8 ranks"):
        corruption.shard(8, 8)


def official_global_loss(noised, clean, predictions):
    """train_ae.py's loss on the global batch: means over all noised / noise-free rows, mixed by the global share."""
    x0_hat = torch.cat([predictions[k][..., :4] for k in noised])
    eps_hat = torch.cat([predictions[k][..., 4:] for k in noised])
    target, noise = torch.cat([noised[k].clean for k in noised]), torch.cat([noised[k].noise for k in noised])
    hidden = torch.cat([noised[k].masking.mask for k in noised]).unsqueeze(-1).float().expand_as(target)
    eps_se, x0_se = (eps_hat - noise) ** 2, (x0_hat - target) ** 2
    dit_loss = ((eps_se * (1 - hidden)).mean() / (1 - hidden).mean() + (x0_se * hidden).mean() / hidden.mean()) / 2
    x0_hat = torch.cat([predictions[k][..., :4] for k in clean])
    target = torch.cat([clean[k].clean for k in clean])
    hidden = torch.cat([clean[k].masking.mask for k in clean]).unsqueeze(-1).float().expand_as(target)
    mae_loss = ((x0_hat - target) ** 2 * hidden).mean() / hidden.mean()
    rows = [view.clean.shape[0] for view in [*noised.values(), *clean.values()]]
    share = sum(view.clean.shape[0] for view in clean.values()) / sum(rows)
    return dit_loss * (1 - share) + mae_loss * share


def test_mean_of_rank_losses_is_the_official_loss_of_the_global_batch():
    """4 simulated ranks of 4 rows, r = 0.4: 6 noise-free rows (2, 2, 1, 1); DDP's mean of the ranks' losses is the
    official loss of the 16 rows."""
    torch.manual_seed(0)
    world_size, batch = 4, 4
    images = torch.randn(world_size * batch, 16, 4)
    objective = DualPredictionLoss()
    rank_losses, noised, clean, predictions = [], {}, {}, {}
    for rank in range(world_size):
        corruption = UnifiedMaskedNoise(no_noise_prob=0.4)
        corruption.shard(rank, world_size)
        views = corruption(images[rank * batch : (rank + 1) * batch], (4, 4))
        loss = 0.0
        for view in views:
            prediction = torch.randn(view.clean.shape[0], 16, 8)
            predictions[(rank, view.name)] = prediction
            (noised if view.name == "noised" else clean)[(rank, view.name)] = view
            loss = loss + view.weight * objective(prediction, view).loss
        rank_losses.append(loss)
    assert [view.clean.shape[0] for view in clean.values()] == [2, 2, 1, 1]
    expected = official_global_loss(noised, clean, predictions)
    torch.testing.assert_close(torch.stack(rank_losses).mean(), expected)


def test_method_setup_passes_rank_and_world_size_to_the_corruption():
    torch.manual_seed(0)
    backbone = UMDBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, decoder_depth=1)
    module = UMD(backbone=backbone, corruption=UnifiedMaskedNoise(no_noise_prob=0.05))
    module._trainer = SimpleNamespace(global_rank=5, world_size=8, datamodule=None)
    module.setup("fit")
    assert (module.corruption.rank, module.corruption.world_size) == (5, 8)
    assert module.corruption.clean_rows(32) == 1
