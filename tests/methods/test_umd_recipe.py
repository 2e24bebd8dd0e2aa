"""UMD's recipe details as the official code computes them: the noise-free share of the global batch under data
parallelism, and the warm-up of ``optax.warmup_cosine_decay_schedule`` with big_vision's step counts."""

import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.corruption import UnifiedMaskedNoise
from maskdiff.methods import UMD
from maskdiff.objectives import DualPredictionLoss
from maskdiff.optim import WarmupCosineLR
from maskdiff.samplers.presets import PRESETS
from tests.helpers import CONFIGS

TRAIN_IMAGES = 1_268_355  # imagenet2012 train[:99%]


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


def optax_warmup_cosine(count: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """``optax.warmup_cosine_decay_schedule(0, peak, warmup_steps, decay_steps=total_steps)`` at ``count``: a linear
    schedule for ``count < warmup_steps``, then ``cosine_decay_schedule(peak, total - warmup)`` at ``count - warmup``."""
    if count < warmup_steps:
        return peak * count / warmup_steps
    decay = total_steps - warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * min(count - warmup_steps, decay) / decay))


def official_steps(epochs: int, batch: int) -> tuple[int, int]:
    """train_ae.py: ``total = u.steps("total")`` = round(epochs · N / B); warmup = int(0.05 · epochs) · N // B."""
    return round(epochs * TRAIN_IMAGES / batch), int(0.05 * epochs) * TRAIN_IMAGES // batch


def rates(scheduler_args: dict, peak: float, steps: int) -> list[float]:
    """The learning rate each of the first ``steps`` optimizer steps trains at, stepped as Lightning steps it."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = WarmupCosineLR(optimizer, **scheduler_args)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def test_warmup_offset_zero_is_optax_at_every_step():
    args = {"warmup_steps": 4, "total_steps": 10, "min_lr_ratio": 0.0, "warmup_offset": 0}
    expected = [optax_warmup_cosine(k, 0.5, 4, 10) for k in range(12)]
    assert rates(args, 0.5, 12) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected[:5] == [0.0, 0.125, 0.25, 0.375, 0.5]
    default = rates({**args, "warmup_offset": 1}, 0.5, 5)
    assert default == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])  # maskdiff's default reaches the peak a step early
    with pytest.raises(ValueError, match="warmup_offset must be 0 or 1, got 2"):
        WarmupCosineLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 4, 10, warmup_offset=2)


@pytest.mark.parametrize(("config", "epochs", "batch", "base_lr"), [
    ("umd_b4_imagenet64.yaml", 800, 1024, 1.5e-4),
    ("umd_l2_imagenet256_latent.yaml", 800, 1024, 1.5e-4),
    ("umd_finetune_b4_imagenet64.yaml", 50, 256, 1.5e-4),
])
def test_imagenet_configs_warm_up_as_the_official_trainer(config, epochs, batch, base_lr):
    """Step counts, peak lr and the rate at a few steps of each ImageNet config against the official formula."""
    loaded = yaml.safe_load((CONFIGS / "umd" / config).read_text())
    trainer, model = loaded["trainer"], loaded["model"]["init_args"]
    assert trainer["devices"] * loaded["data"]["init_args"]["batch_size"] == batch
    total, warmup = official_steps(epochs, batch)
    schedule = model["lr_scheduler"]["init_args"]
    assert schedule == {"warmup_steps": warmup, "total_steps": total, "min_lr_ratio": 0.0, "warmup_offset": 0}
    assert trainer["max_steps"] == total
    peak = model["optimizer"]["init_args"]["lr"]
    assert peak == pytest.approx(base_lr * batch / 256)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = WarmupCosineLR(optimizer, **schedule)
    for step in (0, 1, 2, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + total) // 2, total - 1, total):
        assert peak * scheduler.factor(step) == pytest.approx(optax_warmup_cosine(step, peak, warmup, total), abs=1e-15)


def test_official_step_counts():
    assert official_steps(800, 1024) == (990_902, 49_545)
    assert official_steps(50, 256) == (247_726, 9_909)  # int(0.05 * 50) = 2 warm-up epochs, not 2.5


@pytest.mark.parametrize(("config", "area_min"), [
    ("umd_b4_imagenet64.yaml", 0.8), ("umd_l2_imagenet256_latent.yaml", 0.8), ("umd_finetune_b4_imagenet64.yaml", 0.95),
])
def test_imagenet_configs_crop_sample_and_encode_as_the_official(config, area_min):
    """ae_i1k.py: decode_jpeg_and_inception_crop(size, area_min) (ratio 0.75 to 1.33), evaluation resize_small +
    central_crop; DDIM on big_vision's grid; latents from runwayml/stable-diffusion-v1-5's VAE x 0.18215."""
    loaded = yaml.safe_load((CONFIGS / "umd" / config).read_text())
    data, model = loaded["data"]["init_args"], loaded["model"]["init_args"]
    assert (data["crop"], data["scale"], data["ratio"], data["eval_resize_ratio"]) == ("inception", [area_min, 1.0],
                                                                                       [0.75, 1.33], 1.0)
    assert data["hflip"] is True
    assert model["sampler"]["init_args"] == {"steps": 125, "eta": 1.0, "spacing": "big_vision"}
    if "autoencoder" in model:
        vae = model["autoencoder"]["init_args"]
        assert vae["path"].endswith(PRESETS["umd-cfg2.0"].vae) and vae["scale_factor"] == 0.18215
        assert model["corruption"]["init_args"]["schedule"] == "linear" and model["clip_x0"] is None
