"""UMD: the batch split, the per-view masks and losses of the official training step, register features, sampling."""

import math

import pytest
import torch

from maskdiff.backbones import Backbone
from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.backbones.embeddings import timestep_frequencies
from maskdiff.methods.checkpoints import load_backbone_weights
from maskdiff.corruption import UnifiedMaskedNoise
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_features
from maskdiff.methods import UMD
from maskdiff.objectives import DualPredictionLoss
from maskdiff.samplers import DDIMSampler

NANO = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, decoder_depth=1)


def nano_umd(**overrides) -> UMDBackbone:
    torch.manual_seed(0)
    return UMDBackbone(**{**NANO, **overrides})


class RecordingBackbone(Backbone):
    """Wraps a backbone, declares what it declares, and records what each call received."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []
        for name in ("patchifier", "num_classes", "output_parts", "num_prefix_tokens", "takes_timesteps",
                     "features_take_timesteps", "hidden_tokens"):
            setattr(self, name, getattr(inner, name))

    def forward(self, tokens, t=None, y=None, masking=None):
        self.calls.append({"tokens": tokens.clone(), "t": None if t is None else t.clone(), "y": y, "masking": masking})
        return self.inner(tokens, t, y, masking)


def test_batch_split_and_mask_ratios_are_exact():
    corruption = UnifiedMaskedNoise(no_noise_prob=0.5, clean_mask_ratio=0.75, mask_ratio=0.375)
    clean = torch.randn(10, 16, 4)
    noised, free = corruption(clean, (4, 4))
    assert (noised.name, free.name) == ("noised", "clean")
    assert (noised.rows, free.rows) == (slice(0, 5), slice(5, 10))
    assert (noised.weight, free.weight) == (0.5, 0.5)
    assert noised.masking.mask.sum(dim=1).tolist() == [16 - int(16 * 0.625)] * 5
    assert free.masking.mask.sum(dim=1).tolist() == [12] * 5
    torch.testing.assert_close(noised.clean, clean[:5])
    # an odd batch: int(B * r) rows are noise-free, the rest noised (official n_no_noise = int(B * no_noise_prob))
    noised, free = corruption(torch.randn(7, 16, 4), (4, 4))
    assert (noised.rows, free.rows, noised.weight) == (slice(0, 4), slice(4, 7), 4 / 7)


def test_noise_free_half_is_never_noised_and_runs_at_timestep_zero_without_labels():
    corruption = UnifiedMaskedNoise()
    clean = torch.randn(8, 16, 4)
    noised, free = corruption(clean, (4, 4))
    assert free.noise is None and free.t is None and free.noise_free
    torch.testing.assert_close(free.tokens, clean[4:], rtol=0, atol=0)
    assert torch.equal(free.model_t, torch.zeros(4))
    assert not free.conditional
    # the noised half is conditioned on the diffusion step + 1, so 0 means "clean"
    torch.testing.assert_close(noised.model_t, noised.t.float() + 1)
    alpha, sigma = corruption.schedule.alpha_sigma(noised.t, clean[:4])
    torch.testing.assert_close(noised.tokens, alpha * clean[:4] + sigma * noised.noise)


def test_step_passes_null_labels_and_offset_times_to_the_backbone():
    backbone = RecordingBackbone(nano_umd(num_classes=3))
    module = UMD(backbone=backbone, ema_decay=None)
    module.step_loss(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    noised_call, clean_call = backbone.calls
    assert noised_call["y"].tolist() == [0, 1, 2]
    assert clean_call["y"] is None
    assert torch.all(noised_call["t"] >= 1) and torch.all(clean_call["t"] == 0)


def sequence_mask_to_image_mask(mask: torch.Tensor, patch: int, side: int) -> torch.Tensor:
    """Official helper: token mask (B, N) -> pixel mask (B, 1, H, W)."""
    grid = side // patch
    return mask.float().view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def test_loss_equals_the_official_formula_on_a_hand_built_case():
    """§5.2 of the reference: batch means over pixels, masks upsampled to pixels, views mixed by the split share."""
    torch.manual_seed(3)
    side, patch, channels = 8, 2, 1
    module = UMD(backbone=nano_umd(), ema_decay=None)
    images = torch.randn(6, channels, side, side)
    fixed = torch.randn(6, 16, 8)  # what the "network" predicts: [x0 | eps] tokens per row
    views = module.corruption(module.to_tokens(images), module.patchifier.grid)
    total = sum(view.weight * module.objective(fixed[view.rows], view).loss for view in views)

    unpatch = module.patchifier.unpatchify
    noised, free = views
    n_noise = noised.clean.shape[0]
    x0_noise, x0_clean = images[:n_noise], images[n_noise:]
    # t = 0 half
    pred = unpatch(fixed[free.rows][..., :4])
    mask_img = sequence_mask_to_image_mask(free.masking.mask, patch, side)
    mae_loss = ((pred - x0_clean) ** 2 * mask_img).mean() / mask_img.mean()
    # noised half
    x0_hat, eps_hat = unpatch(fixed[noised.rows][..., :4]), unpatch(fixed[noised.rows][..., 4:])
    eps = unpatch(noised.noise)
    mask_img = sequence_mask_to_image_mask(noised.masking.mask, patch, side)
    eps_se, x0_se = (eps_hat - eps) ** 2, (x0_hat - x0_noise) ** 2
    dit_loss = ((eps_se * (1 - mask_img)).mean() / (1 - mask_img).mean() + (x0_se * mask_img).mean() / mask_img.mean()) / 2
    r = (images.shape[0] - n_noise) / images.shape[0]
    expected = dit_loss * (1 - r) + mae_loss * r
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize(
    ("no_noise_prob", "mask_ratio", "views", "masked"),
    [(0.0, 0.0, ["noised"], False), (0.0, 0.5, ["noised"], True), (1.0, 0.375, ["clean"], True)],
    ids=["dit_like", "maskdit_like", "mae_like"],
)
def test_baselines_reduce_to_their_losses(no_noise_prob, mask_ratio, views, masked):
    torch.manual_seed(0)
    corruption = UnifiedMaskedNoise(no_noise_prob=no_noise_prob, mask_ratio=mask_ratio)
    clean = torch.randn(4, 16, 4)
    made = corruption(clean, (4, 4))
    assert [view.name for view in made] == views
    (view,) = made
    assert view.weight == 1.0 and (view.masking is not None) == masked
    prediction = torch.randn(4, 16, 8)
    loss = DualPredictionLoss()(prediction, view).loss
    x0_se = (prediction[..., :4] - clean) ** 2
    if views == ["clean"]:
        hidden = view.masking.mask.unsqueeze(-1).float()
        expected = (x0_se * hidden).sum() / (hidden.sum() * 4)
    else:
        eps_se = (prediction[..., 4:] - view.noise) ** 2
        if masked:
            hidden = view.masking.mask.unsqueeze(-1).float()
            expected = ((eps_se * (1 - hidden)).sum() / ((1 - hidden).sum() * 4) + (x0_se * hidden).sum() / (hidden.sum() * 4)) / 2
        else:
            expected = (eps_se.mean() + x0_se.mean()) / 2  # DiT-like: dual x0/eps loss, no masking
    torch.testing.assert_close(loss, expected)


def test_probe_reads_the_mean_of_the_registers_at_timestep_zero_without_mask():
    module = UMD(backbone=nano_umd(num_registers=4), ema_decay=None)
    images = torch.randn(3, 1, 8, 8)
    features = extract_features(module, images, FeatureSpec(pooling="prefix_mean", timestep=0, use_ema=False))
    module.backbone.eval()
    tokens = module.to_tokens(images)
    encoded = module.backbone.forward_features(tokens, t=torch.zeros(3))
    assert encoded.shape == (3, 4 + 16, 32)
    torch.testing.assert_close(features, encoded[:, :4].mean(dim=1))
    # the default pooling of a UMD backbone is the register mean

    assert module.backbone.default_pooling == "prefix_mean"


def test_time_embedding_is_sin_first_with_tensor2tensor_spacing():
    t = torch.tensor([0.0, 1.0, 37.0])
    dim, half = 32, 16
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(timestep_frequencies(t, dim, cos_first=False, divisor_shift=1), expected)


@pytest.mark.parametrize("adaln", [True, False])
def test_backbone_shapes_and_masked_encoder(adaln):
    backbone = nano_umd(adaln=adaln, num_classes=5)
    tokens = torch.randn(2, 16, 4)
    out = backbone(tokens, torch.tensor([0.0, 10.0]), torch.tensor([1, 2]))
    assert out.shape == (2, 16, 8)
    from maskdiff.corruption import random_masking

    masking = random_masking(2, 16, 0.75)
    assert backbone(tokens, torch.zeros(2), None, masking).shape == (2, 16, 8)
    assert backbone.forward_features(tokens, torch.zeros(2), masking=masking).shape == (2, 4 + 4, 32)
    # hidden tokens do not reach the encoder: changing them leaves the registers unchanged
    changed = torch.where(masking.mask.unsqueeze(-1), torch.randn_like(tokens), tokens)
    backbone.eval()
    torch.testing.assert_close(
        backbone.forward_features(tokens, torch.zeros(2), masking=masking)[:, :4],
        backbone.forward_features(changed, torch.zeros(2), masking=masking)[:, :4],
    )


def test_sampler_conditions_on_offset_timesteps_and_reads_the_eps_head():
    backbone = RecordingBackbone(nano_umd())
    module = UMD(backbone=backbone, ema_decay=None, sampler=DDIMSampler(4, eta=1.0), clip_x0=1.0)
    images = module.generate(num=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8)
    times = sorted({float(call["t"][0]) for call in backbone.calls})
    assert min(times) == 1.0  # diffusion step 0 is conditioned as 1; 0 is reserved for clean inputs
    denoiser = module.denoiser(use_ema=False)
    assert denoiser.prediction == "eps" and denoiser.prediction_part == 1 and denoiser.time_offset == 1


def test_class_conditional_finetune_starts_from_an_unconditional_pretraining(tmp_path):
    pretrained = UMD(backbone=nano_umd(num_classes=0), ema_decay=None)
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": pretrained.state_dict()}, path)
    conditional = nano_umd(num_classes=10)
    fresh = load_backbone_weights(conditional, path)
    assert fresh == ["y_embedder.embedding_table.weight", "y_trunk.0.bias", "y_trunk.0.weight", "y_trunk.2.bias", "y_trunk.2.weight"]
    torch.testing.assert_close(conditional.blocks[0].attn.qkv.weight, pretrained.backbone.blocks[0].attn.qkv.weight)
    wider = nano_umd(hidden_size=64)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_backbone_weights(wider, path)


def test_invalid_settings_name_the_value():
    with pytest.raises(ValueError, match="no_noise_prob 1.5"):
        UnifiedMaskedNoise(no_noise_prob=1.5)
    with pytest.raises(ValueError, match="clean_mask_ratio 1.0"):
        UnifiedMaskedNoise(clean_mask_ratio=1.0)
    with pytest.raises(ValueError, match="sample_with 'v'"):
        DualPredictionLoss(sample_with="v")
    with pytest.raises(ValueError, match="init_weights 'best'"):
        UMD(backbone=nano_umd(), init_weights="best")


@pytest.mark.slow
def test_pretrain_probe_then_class_conditional_finetune_through_the_cli(tmp_path, digits_cache):
    """configs/umd: pre-train (loss falls, online register probe logged), fine-tune from it, sample from the result."""
    import csv

    from maskdiff.methods.checkpoints import load_method
    from maskdiff.tools.main import main
    from tests.helpers import CONFIGS, FAST_GRID, config_in, single_thread

    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    pre_dir.mkdir(), ft_dir.mkdir()
    config, ckpt_dir = config_in(pre_dir, CONFIGS / "umd" / "umd_digits.yaml")
    with single_thread():
        main(["fit", "--config", str(config), "--trainer.max_steps", "100", "--trainer.log_every_n_steps", "5",
              "--trainer.check_val_every_n_epoch", "2"])
    rows = list(csv.DictReader(next((pre_dir / "logs").rglob("metrics.csv")).open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    probe = [float(row["probe/top1"]) for row in rows if row.get("probe/top1")]
    assert probe and probe[-1] > 0.15  # chance is 0.1 (300 held-out digits: 0.15 is 3 standard errors above it)
    pretrained = ckpt_dir / "last.ckpt"

    config, ft_ckpt_dir = config_in(ft_dir, CONFIGS / "umd" / "umd_finetune_digits.yaml", grid=FAST_GRID)
    with single_thread():
        main(["fit", "--config", str(config), "--trainer.max_steps", "6", "--model.init_args.init_from", str(pretrained)])
    pretrained.unlink()  # the fine-tuned checkpoint must not need its initialisation file any more
    module = load_method(ft_ckpt_dir / "last.ckpt")
    assert module.backbone.num_classes == 10 and module.ema_backbone is not None
    images = module.generate(torch.tensor([3, 7]), steps=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_compare_umd_example_probes_and_finetunes_clean_and_noised_variants(tmp_path, digits_cache):
    import json
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compare_umd.py"), "--pretrain_steps", "3", "--finetune_steps", "2",
         "--per_class", "1", "--shots", "2", "--only", "UMD", "MAE-like", "MaskDiT-like", "--out", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [run["name"] for run in report["runs"]] == ["UMD", "MAE-like", "MaskDiT-like"]  # DiT-like: as MaskDiT-like
    # runs without a noise-free step are probed as the paper does: input noised to t = 50, the model at t = 51
    assert [run["probe_input"] for run in report["runs"]] == ["clean, t=0"] * 2 + ["noised to t=50, model t=51"]
    for run in report["runs"]:
        assert 0.0 <= run["probe_top1"] <= 1.0 and 0.0 <= run["2shot_top1"] <= 1.0
        assert run["digits_fd"] > 0 and run["pretrain_images_per_s"] > 0
    # the MAE-like baseline keeps in-context conditioning in its fine-tune (the architecture must match)
    finetune = (tmp_path / "out" / "mae_like_finetune.yaml").read_text()
    assert "adaln: false" in finetune and "no_noise_prob: 0.05" in finetune
