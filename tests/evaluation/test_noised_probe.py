"""``noise_t``: probing noised inputs as UMD's paper probes its DiT-like and MaskDiT-like baselines (big_vision's
``noised_predict``: x_t at t = 50 with the method's schedule, the model at t = 51)."""

import json
import math

import lightning as L
import pytest
import torch

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.backbones import create_backbone
from maskdiff.backbones.features import FeatureSpec
from maskdiff.callbacks import OnlineLinearProbe
from maskdiff.corruption import UnifiedMaskedNoise
from maskdiff.evaluation.features import extract_dataset_features, extract_features
from maskdiff.methods import UMD
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.probe import probe

NANO = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, decoder_depth=1)

pytestmark = pytest.mark.usefixtures("one_thread")


def dit_like_umd() -> UMD:
    """A DiT-like UMD whose zero-initialised parts (adaLN gates, registers) are perturbed, so features vary."""
    torch.manual_seed(0)
    backbone = UMDBackbone(**NANO)
    with torch.no_grad():
        for parameter in backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return UMD(backbone=backbone, corruption=UnifiedMaskedNoise(no_noise_prob=0.0, mask_ratio=0.0), ema_decay=None)


def record_features(module: UMD, monkeypatch) -> list[dict]:
    calls, original = [], module.backbone.forward_features

    def recording(tokens, t=None, **kwargs):
        calls.append({"tokens": tokens.clone(), "t": t.clone()})
        return original(tokens, t=t, **kwargs)

    monkeypatch.setattr(module.backbone, "forward_features", recording)
    return calls


def test_noise_t_noises_the_input_at_50_with_the_methods_schedule_and_conditions_on_51(monkeypatch):
    module = dit_like_umd()
    calls = record_features(module, monkeypatch)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    spec = FeatureSpec(pooling="prefix_mean", noise_t=50, noise_seed=7, use_ema=False)
    features = extract_features(module, images, spec)

    x0 = module.to_tokens(images)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  UMD's cosine ᾱ in pixel space
    abar = f(51 / 1000) / f(0)  # ᾱ_50 = Π_{s ≤ 50} (1 - β_s)
    torch.testing.assert_close(calls[0]["tokens"], math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps)
    assert calls[0]["t"].tolist() == [51, 51, 51]
    torch.testing.assert_close(features, module.backbone.forward_features(calls[0]["tokens"], t=calls[0]["t"])[:, :4].mean(1))

    assert torch.equal(extract_features(module, images, spec), features)  # seeded: reproducible
    assert not torch.equal(extract_features(module, images, FeatureSpec("prefix_mean", noise_t=50, noise_seed=8, use_ema=False)), features)
    extract_features(module, images, FeatureSpec("prefix_mean", timestep=0, use_ema=False))
    torch.testing.assert_close(calls[-1]["tokens"], x0)  # without noise_t the input stays clean
    assert spec.as_dict() | {"timestep": 51} == {"pooling": "prefix_mean", "depth": None, "timestep": 51, "weights": "raw",
                                                "noise_t": 50, "noise_seed": 7}


def test_dataset_features_draw_one_seeded_noise_stream(monkeypatch):
    module = dit_like_umd()
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    batches = [(images[:4], torch.arange(4)), (images[4:], torch.arange(2))]
    spec = FeatureSpec("prefix_mean", noise_t=50, use_ema=False)
    first, labels = extract_dataset_features(module, batches, spec)
    again, _ = extract_dataset_features(module, batches, spec)
    assert torch.equal(first, again) and labels.tolist() == [0, 1, 2, 3, 0, 1]
    generator = torch.Generator().manual_seed(0)
    expected = torch.cat([extract_features(module, batch, spec, generator) for batch, _ in batches])
    torch.testing.assert_close(first, expected)


def test_noise_t_is_refused_where_it_cannot_apply():
    mae = create_backbone("mae_nano")
    with pytest.raises(ValueError, match="noise_t 50 was given, but MAE is not conditioned on timesteps"):
        extract_features(mae, torch.zeros(1, 1, 8, 8), FeatureSpec("cls", noise_t=50))
    with pytest.raises(ValueError, match="noise_t 1000 is out of range; the schedule has steps 0..999"):
        extract_features(dit_like_umd(), torch.zeros(1, 1, 8, 8), FeatureSpec("prefix_mean", noise_t=1000, use_ema=False))
    with pytest.raises(ValueError, match="needs a noise schedule"):
        extract_features(UMDBackbone(**NANO), torch.zeros(1, 1, 8, 8), FeatureSpec("prefix_mean", noise_t=5))
    with pytest.raises(ValueError, match="noise_t -1 is invalid"):
        FeatureSpec(noise_t=-1)


class Labelled(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.batches = [(torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1, torch.arange(8) % 2)]

    def train_dataloader(self):
        return self.batches

    def val_dataloader(self):
        return self.batches


def test_probe_command_and_online_probe_take_noise_t(tmp_path, monkeypatch):
    module = dit_like_umd()
    init_args = {"backbone": {"class_path": "maskdiff.backbones.UMD", "init_args": NANO},
                 "corruption": {"class_path": "maskdiff.corruption.UnifiedMaskedNoise",
                                "init_args": {"no_noise_prob": 0.0, "mask_ratio": 0.0}}, "ema_decay": None}
    write_method_checkpoint(tmp_path / "umd.ckpt", "maskdiff.methods.UMD", init_args, module.state_dict())
    out = tmp_path / "probe.json"
    probe(str(tmp_path / "umd.ckpt"), Labelled(), noise_t=50, noise_seed=2, epochs=1, warmup_epochs=0, batch_size=8,
          optimizer="sgd", cache_dir=str(tmp_path / "cache"), out=str(out))
    result = json.loads(out.read_text())
    assert (result["noise_t"], result["noise_seed"], result["timestep"], result["pooling"]) == (50, 2, 51, "prefix_mean")

    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    callback = OnlineLinearProbe(noise_t=50, num_classes=2)
    callback.setup(trainer, module, "fit")
    assert (callback.spec.noise_t, callback.spec.timestep) == (50, 51)
    calls = record_features(module, monkeypatch)
    images = torch.rand(2, 1, 8, 8)
    step = callback.features(trainer, module, images, callback.noise_generator(trainer, 0, 0, 0))
    again = callback.features(trainer, module, images, callback.noise_generator(trainer, 0, 0, 0))
    assert torch.equal(step, again) and calls[0]["t"].tolist() == [51, 51]
    assert not torch.equal(calls[0]["tokens"], module.to_tokens(images))
