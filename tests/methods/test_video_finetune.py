"""Fine-tuning a DiffMAE video encoder on moving-digits clips: weights, space-time pooling, learning, mixing, errors."""

import numpy as np
import pytest
import torch

from maskdiff.backbones import DiffMAE as DiffMAEBackbone
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.data.moving_digits import render_moving_digits
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_features
from maskdiff.methods import DiffMAE
from maskdiff.methods.finetune import FineTune
from tests.helpers import CONFIGS, config_in

VIDEO = {"input_size": 16, "patch_size": 4, "in_channels": 1, "num_frames": 4, "tubelet": 2, "hidden_size": 32,
         "depth": 2, "num_heads": 2, "decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2}
IMAGE = {key: value for key, value in VIDEO.items() if key not in ("num_frames", "tubelet")}
FINETUNE_MOVING_DIGITS = CONFIGS / "diffmae" / "finetune_moving_digits.yaml"
SMALL_MOVING_DIGITS = ["--data.init_args.num_frames", "4", "--data.init_args.image_size", "16",
                       "--data.init_args.canvas", "16", "--data.init_args.glyph_size", "8",
                       "--data.init_args.num_train", "32", "--data.init_args.num_val", "16",
                       "--data.init_args.batch_size", "8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def diffmae_ckpt(path, backbone_args: dict):
    torch.manual_seed(0)
    method = DiffMAE(backbone=DiffMAEBackbone(**backbone_args))
    backbone = {"class_path": "maskdiff.backbones.DiffMAE", "init_args": backbone_args}
    return write_method_checkpoint(path, "maskdiff.methods.DiffMAE", {"backbone": backbone}, method.state_dict())


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    """An untrained tiny DiffMAE video backbone (clips of 4 frames, 16 px; a (2, 4, 4) grid of tubelets)."""
    return diffmae_ckpt(tmp_path_factory.mktemp("diffmae_video") / "video.ckpt", VIDEO)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    return diffmae_ckpt(tmp_path_factory.mktemp("diffmae_image") / "image.ckpt", IMAGE)


def clips(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` moving-digits clips ``(count, 1, 4, 16, 16)`` in [-1, 1] and their digit classes."""
    videos = [render_moving_digits(i, "train", num_frames=4, canvas=16, glyph_size=8, seed=seed) for i in range(count)]
    frames = np.stack([frames for frames, _ in videos])
    labels = torch.tensor([info["labels"][0] for _, info in videos])
    return torch.from_numpy(frames).float().div(127.5).sub(1).unsqueeze(1), labels


def finetune(ckpt, **kwargs) -> FineTune:
    model = FineTune(str(ckpt), num_classes=10, weights="raw", **kwargs)
    model.configure_model()
    return model


def test_encoder_weights_are_loaded_exactly_and_only_the_encoder_trains(video_ckpt):
    saved = torch.load(video_ckpt, weights_only=True)["state_dict"]
    model = finetune(video_ckpt)
    loaded = model.backbone.state_dict()
    backbone_keys = {key[len("backbone."):] for key in saved if key.startswith("backbone.")}
    assert backbone_keys == set(loaded)
    for key in backbone_keys:
        assert torch.equal(loaded[key], saved[f"backbone.{key}"]), key
    trainable = {name for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert "blocks.1.mlp.fc2.weight" in trainable and "patch_embed.weight" in trainable
    assert not any(name.startswith(("decoder_blocks", "noisy_embed", "t_embedder", "context_embed")) for name in trainable)


def test_head_reads_tokens_pooled_over_space_and_time(video_ckpt):
    model = finetune(video_ckpt).eval()
    inputs, _ = clips(4)
    assert model(inputs).shape == (4, 10)
    tokens = model.to_tokens(inputs)
    assert tokens.shape == (4, 2 * 4 * 4, 2 * 4 * 4)
    with torch.no_grad():
        encoded = model.backbone.forward_features(tokens, depth=model.backbone.num_blocks)
        expected = model.fc_norm(encoded[:, 1:].mean(dim=1))
        torch.testing.assert_close(model.features(inputs), expected)
        changed = inputs.clone()
        changed[:, :, -1] = -1.0  # blank the last frame: the pooled features must see it
        assert (model.features(changed) - model.features(inputs)).abs().amax(dim=1).min() > 1e-4


def test_several_views_of_a_clip_are_averaged_in_probability(video_ckpt):
    model = finetune(video_ckpt).eval()
    first, _ = clips(3)
    second, _ = clips(3, seed=1)
    with torch.no_grad():
        expected = (model(first).softmax(-1) + model(second).softmax(-1)) / 2
        logits = model.evaluation_logits(torch.stack([first, second], dim=1))
        torch.testing.assert_close(logits.exp(), expected)
        torch.testing.assert_close(model.evaluation_logits(first), model(first))


def test_loss_falls_on_a_fixed_batch_of_clips(video_ckpt):
    torch.manual_seed(0)
    model = finetune(video_ckpt, layer_decay=0.75, drop_path_rate=0.1,
                     optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3, weight_decay=0.05))
    optimizer = model.configure_optimizers()
    inputs, labels = clips(8)
    losses = []
    for _ in range(20):
        loss = model.criterion(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses  # chance level is ln 10 = 2.30


def test_mixup_and_cutmix_mix_whole_clips(video_ckpt):
    inputs, labels = clips(4)
    partners = inputs.flip(0)
    torch.manual_seed(0)
    mixed, targets = finetune(video_ckpt, mixup=0.8).mix(inputs.clone(), labels)
    difference = inputs - partners
    lam = ((mixed - partners) * difference).sum() / difference.square().sum()
    torch.testing.assert_close(mixed, lam * inputs + (1 - lam) * partners)  # one weight for every clip and frame
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.flip(0))

    torch.manual_seed(1)
    boxed, _ = finetune(video_ckpt, cutmix=1.0).mix(inputs.clone(), labels)
    box = (boxed != inputs).flatten(0, 2).any(dim=0)  # (H, W): pixels changed in any clip or frame
    assert box.any()
    assert torch.equal(boxed, torch.where(box, partners, inputs))  # the same box pasted into every frame
    with pytest.raises(ValueError, match="even batch size, got 3"):
        finetune(video_ckpt, cutmix=1.0).mix(inputs[:3].clone(), labels[:3])


def test_offline_features_of_a_video_checkpoint(video_ckpt):
    from maskdiff.methods.checkpoints import load_method

    method = load_method(video_ckpt)
    inputs, _ = clips(3)
    features = extract_features(method, inputs, FeatureSpec(pooling="mean", use_ema=False))
    assert features.shape == (3, VIDEO["hidden_size"])
    cls = extract_features(method, inputs, FeatureSpec(pooling="cls", use_ema=False))
    assert not torch.allclose(cls, features)


def test_clips_for_an_image_backbone_and_images_for_a_video_backbone_are_named(video_ckpt, image_ckpt):
    inputs, _ = clips(2)
    with pytest.raises(ValueError, match=r"takes clips \(B, C, T, H, W\) = \(B, 1, 4, 16, 16\), got a batch of shape \(2, 1, 16, 16\)"):
        finetune(video_ckpt)(inputs[:, :, 0])
    with pytest.raises(ValueError, match=r"takes images \(B, C, H, W\), got a batch of shape \(2, 1, 4, 16, 16\)"):
        finetune(image_ckpt)(inputs)


def test_fit_through_the_moving_digits_config(video_ckpt, tmp_path):
    config, _ = config_in(tmp_path, FINETUNE_MOVING_DIGITS)
    cli = MaskDiffCLI(args=[
        "fit", "--config", str(config), "--model.init_args.ckpt", str(video_ckpt), *SMALL_MOVING_DIGITS,
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
    ])
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.0 <= float(metrics["val/top1"]) <= float(metrics["val/top5"]) <= 1.0
    assert cli.model.is_video and cli.model.spec.pooling == "mean" and cli.model.spec.timestep is None


def test_data_of_the_wrong_kind_is_refused_before_training(video_ckpt, image_ckpt, tmp_path, digits_cache):
    config, _ = config_in(tmp_path, FINETUNE_MOVING_DIGITS)
    common = ["--trainer.fast_dev_run", "1", "--trainer.logger", "false"]
    with pytest.raises(ValueError, match="gives clips of 4 frames, but the backbone of .* takes images"):
        MaskDiffCLI(args=["fit", "--config", str(config), "--model.init_args.ckpt", str(image_ckpt), *SMALL_MOVING_DIGITS,
                          "--data.init_args.cache_dir", str(tmp_path / "cache"), *common])
    with pytest.raises(ValueError, match="gives clips of 8 frames, but .* takes clips .* of T = 4 frames"):
        MaskDiffCLI(args=["fit", "--config", str(config), "--model.init_args.ckpt", str(video_ckpt), *SMALL_MOVING_DIGITS,
                          "--data.init_args.num_frames", "8", "--data.init_args.cache_dir", str(tmp_path / "cache"), *common])
    (tmp_path / "digits").mkdir()
    digits, _ = config_in(tmp_path / "digits", CONFIGS / "diffmae" / "finetune_digits.yaml")
    with pytest.raises(ValueError, match="DigitsDataModule gives images, but the backbone of .* takes clips"):
        MaskDiffCLI(args=["fit", "--config", str(digits), "--model.init_args.ckpt", str(video_ckpt), *common])
