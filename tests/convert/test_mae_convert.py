"""Official MAE checkpoints load into maskdiff's MAE and compute the official function.

The reference below re-implements facebookresearch/mae ``models_mae.py`` (and ``util/pos_embed.py``) functionally
from an official-layout state dict, with no maskdiff code, so a wrong layout conversion cannot cancel out.
"""

from __future__ import annotations

import argparse
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.convert.mae import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    convert_mae_state_dict,
    infer_mae_config,
    load_official_mae,
    mae_from_official,
)
from maskdiff.corruption import Corrupted
from maskdiff.corruption.masking import masking_from_noise
from maskdiff.methods import MAE as MAEMethod
from maskdiff.objectives import MaskedReconstruction

TOLERANCE = 1e-5
# A size outside the registry (heads must be given) and the registered ``mae_nano`` (heads are looked up).
SMALL = {"input_size": 12, "patch_size": 3, "in_channels": 3, "hidden_size": 48, "depth": 2, "num_heads": 4,
         "decoder_hidden_size": 32, "decoder_depth": 2, "decoder_num_heads": 2}
NANO = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "decoder_hidden_size": 16, "decoder_depth": 1, "decoder_num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- reference
def official_1d_sincos(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def official_2d_sincos(dim: int, grid_size: int) -> np.ndarray:
    """``get_2d_sincos_pos_embed(dim, grid_size, cls_token=True)``: ``(1 + G*G, dim)``."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([official_1d_sincos(dim // 2, grid[0]), official_1d_sincos(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def official_block(sd: dict, prefix: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm ``Block``: LN -> qkv attention -> proj, LN -> fc1 GELU fc2, residuals; LayerNorm eps 1e-6."""
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm1.weight"], sd[f"{prefix}.norm1.bias"], eps=1e-6)
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-2, -1) * head_dim**-0.5, dim=-1)
    mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + F.linear(mixed, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = F.layer_norm(x, (width,), sd[f"{prefix}.norm2.weight"], sd[f"{prefix}.norm2.bias"], eps=1e-6)
    h = F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def official_random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    batch, length, width = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, width))
    mask = torch.ones([batch, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


def count_blocks(sd: dict, prefix: str) -> int:
    return sum(1 for key in sd if key.startswith(f"{prefix}.") and key.endswith(".norm1.weight"))


def official_forward_encoder(sd, imgs, mask_ratio, noise, patch_size, num_heads):
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:, :]
    x, mask, ids_restore = official_random_masking(x, mask_ratio, noise)
    cls_token = sd["cls_token"] + sd["pos_embed"][:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for i in range(count_blocks(sd, "blocks")):
        x = official_block(sd, f"blocks.{i}", x, num_heads)
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x, mask, ids_restore


def official_forward_decoder(sd, x, ids_restore, num_heads):
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    mask_tokens = sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + sd["decoder_pos_embed"]
    for i in range(count_blocks(sd, "decoder_blocks")):
        x = official_block(sd, f"decoder_blocks.{i}", x, num_heads)
    x = F.layer_norm(x, x.shape[-1:], sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    x = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])
    return x[:, 1:, :]


def official_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    n, c, side, _ = imgs.shape
    h = w = side // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p**2 * c)


def official_forward_loss(imgs, pred, mask, patch_size, norm_pix_loss):
    target = official_patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def official_mae_forward(sd, imgs, mask_ratio, noise, config, norm_pix_loss):
    """``MaskedAutoencoderViT.forward`` with the masking noise given: ``(loss, pred (N, L, p*p*C), mask (N, L))``."""
    latent, mask, ids_restore = official_forward_encoder(sd, imgs, mask_ratio, noise, config["patch_size"], config["num_heads"])
    pred = official_forward_decoder(sd, latent, ids_restore, config["decoder_num_heads"])
    return official_forward_loss(imgs, pred, mask, config["patch_size"], norm_pix_loss), pred, mask


# ---------------------------------------------------------------------------------------------- fixtures
def random_official_state_dict(input_size, patch_size, in_channels, hidden_size, depth, decoder_hidden_size,
                               decoder_depth, decoder: bool = True, seed: int = 0, **_) -> dict[str, torch.Tensor]:
    """An official-layout MAE state dict with non-zero random values in every tensor."""
    generator = torch.Generator().manual_seed(seed)
    d, dd, p, c = hidden_size, decoder_hidden_size, patch_size, in_channels
    grid = input_size // p

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features),
                f"{prefix}.bias": 0.1 * torch.randn(out_features, generator=generator)}

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + 0.1 * torch.randn(width, generator=generator),
                f"{prefix}.bias": 0.1 * torch.randn(width, generator=generator)}

    def block(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return (norm(f"{prefix}.norm1", width) | linear(f"{prefix}.attn.qkv", 3 * width, width)
                | linear(f"{prefix}.attn.proj", width, width) | norm(f"{prefix}.norm2", width)
                | linear(f"{prefix}.mlp.fc1", 4 * width, width) | linear(f"{prefix}.mlp.fc2", width, 4 * width))

    sd = {
        "cls_token": 0.5 * torch.randn(1, 1, d, generator=generator),
        "pos_embed": torch.from_numpy(official_2d_sincos(d, grid)).float().unsqueeze(0),
        "patch_embed.proj.weight": torch.randn(d, c, p, p, generator=generator) / math.sqrt(c * p * p),
        "patch_embed.proj.bias": 0.1 * torch.randn(d, generator=generator),
    }
    for i in range(depth):
        sd |= block(f"blocks.{i}", d)
    sd |= norm("norm", d)
    if decoder:
        sd |= linear("decoder_embed", dd, d)
        sd["mask_token"] = 0.5 * torch.randn(1, 1, dd, generator=generator)
        sd["decoder_pos_embed"] = torch.from_numpy(official_2d_sincos(dd, grid)).float().unsqueeze(0)
        for i in range(decoder_depth):
            sd |= block(f"decoder_blocks.{i}", dd)
        sd |= norm("decoder_norm", dd)
        sd |= linear("decoder_pred", p * p * c, dd)
    return sd


def images_and_noise(config: dict, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size, channels = config["input_size"], config["in_channels"]
    tokens = (size // config["patch_size"]) ** 2
    return torch.randn(batch, channels, size, size, generator=generator), torch.rand(batch, tokens, generator=generator)


def save_official(tmp_path, sd: dict, name: str = "mae.pth", wrap: bool = True):
    path = tmp_path / name
    torch.save({"model": sd} if wrap else sd, path)
    return path


def assert_matches_official(model, sd: dict, config: dict, ratios=(0.75, 0.5)) -> None:
    imgs, noise = images_and_noise(config)
    tokens = model.patchifier.patchify(imgs)
    num_tokens = tokens.shape[1]
    for ratio in ratios:
        masking = masking_from_noise(noise, int(num_tokens * (1 - ratio)))
        with torch.no_grad():
            prediction = model(tokens, masking=masking)
        view = Corrupted(tokens=tokens, clean=tokens, masking=masking)
        for norm_pix in (False, True):
            official_loss, official_pred, official_mask = official_mae_forward(sd, imgs, ratio, noise, config, norm_pix)
            assert torch.equal(masking.mask, official_mask.bool())
            assert (prediction - official_pred).abs().max() <= TOLERANCE
            loss = MaskedReconstruction(norm_pix=norm_pix, region="masked")(prediction, view).loss
            assert abs(loss.item() - official_loss.item()) <= TOLERANCE * max(1.0, official_loss.item())


# ---------------------------------------------------------------------------------------------- tests
def test_full_checkpoint_matches_official_forward_and_loss(tmp_path):
    sd = random_official_state_dict(**SMALL)
    path = save_official(tmp_path, sd)

    model = load_official_mae(path, num_heads=SMALL["num_heads"], decoder_num_heads=SMALL["decoder_num_heads"])

    assert_matches_official(model, sd, SMALL)


def test_registered_size_needs_no_heads_and_bare_state_dicts_load(tmp_path):
    sd = random_official_state_dict(**NANO, seed=3)
    path = save_official(tmp_path, sd, wrap=False)

    model = load_official_mae(path)

    assert (model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads) == (2, 2)
    assert_matches_official(model, sd, NANO)


def test_training_checkpoint_with_ddp_prefix_loads(tmp_path):
    sd = random_official_state_dict(**NANO, seed=4)
    checkpoint = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3,
                  "args": argparse.Namespace(model="mae_vit_large_patch16", norm_pix_loss=True)}
    path = tmp_path / "checkpoint-3.pth"
    torch.save(checkpoint, path)

    assert_matches_official(load_official_mae(path), sd, NANO, ratios=(0.75,))


def test_encoder_only_checkpoint_loads_encoder_and_fresh_decoder(tmp_path, caplog):
    full = random_official_state_dict(**NANO, seed=5)
    encoder_only = random_official_state_dict(**NANO, seed=5, decoder=False)
    assert set(encoder_only) < set(full)
    path = save_official(tmp_path, encoder_only, name="mae_pretrain_vit_nano.pth")

    with caplog.at_level(logging.WARNING, logger="maskdiff.convert"):
        model = load_official_mae(path)
    imported = mae_from_official({"model": encoder_only})

    assert "encoder-only" in caplog.text and "freshly initialised" in caplog.text
    assert not imported.decoder_loaded and imported.config["decoder_hidden_size"] == NANO["decoder_hidden_size"]
    imgs, noise = images_and_noise(NANO)
    masking = masking_from_noise(noise, 4)
    official_latent, _, _ = official_forward_encoder(encoder_only, imgs, 0.75, noise, NANO["patch_size"], NANO["num_heads"])
    with torch.no_grad():
        latent = model.forward_features(model.patchifier.patchify(imgs), masking=masking)
        assert model(model.patchifier.patchify(imgs), masking=masking).shape == (3, 16, 4)
    assert (latent - official_latent).abs().max() <= TOLERANCE
    assert not torch.equal(model.mask_token, full["mask_token"])


def test_encoder_only_checkpoint_of_unregistered_size_gets_the_official_decoder():
    config = infer_mae_config(random_official_state_dict(**SMALL, decoder=False), num_heads=4)

    assert (config["decoder_hidden_size"], config["decoder_depth"], config["decoder_num_heads"]) == (512, 8, 16)


def test_convert_cli_writes_a_method_checkpoint(tmp_path, capsys):
    sd = random_official_state_dict(**SMALL, seed=7)
    src = save_official(tmp_path, sd, name="mae_visualize_small.pth")
    heads = ["--num_heads", "4", "--decoder_num_heads", "2"]

    main(["convert", "mae", str(src), str(tmp_path / "exact.ckpt"), *heads, "--fold_imagenet_normalization", "false"])
    main(["convert", "mae", str(src), str(tmp_path / "folded.ckpt"), *heads])

    assert "decoder loaded" in capsys.readouterr().out
    exact = load_method(tmp_path / "exact.ckpt")
    assert type(exact) is MAEMethod and exact.ema_backbone is None
    assert exact.objective.norm_pix is False and exact.corruption.mask_ratio == 0.75
    assert_matches_official(exact.backbone.eval(), sd, SMALL, ratios=(0.75,))

    folded = load_method(tmp_path / "folded.ckpt").backbone.eval()
    imgs, noise = images_and_noise(SMALL)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = imgs.clamp(-1, 1)  # maskdiff's [-1, 1] pixels; the official model reads (x01 - mean) / std
    _, official_pred, _ = official_mae_forward(sd, ((pixels + 1) / 2 - mean) / std, 0.75, noise, SMALL, False)
    official_in_pixels = official_patchify(
        2 * (exact.patchifier.unpatchify(official_pred) * std + mean) - 1, SMALL["patch_size"])
    with torch.no_grad():
        prediction = folded(folded.patchifier.patchify(pixels), masking=masking_from_noise(noise, 4))
    assert (prediction - official_in_pixels).abs().max() <= 1e-4


def test_convert_cli_encoder_only_defaults_to_norm_pix(tmp_path):
    src = save_official(tmp_path, random_official_state_dict(**NANO, decoder=False), name="mae_pretrain_vit_nano.pth")

    main(["convert", "mae", str(src), str(tmp_path / "nano.ckpt"), "--fold_imagenet_normalization", "false"])

    method = load_method(tmp_path / "nano.ckpt")
    assert method.objective.norm_pix is True
    assert method.backbone.decoder_pred.weight.shape == (4, 16)


def test_missing_heads_are_explained():
    sd = random_official_state_dict(**SMALL)

    with pytest.raises(ValueError, match="pass num_heads"):
        convert_mae_state_dict(sd)
    with pytest.raises(ValueError, match="pass decoder_num_heads"):
        convert_mae_state_dict(sd, num_heads=4)


def test_non_mae_state_dict_names_missing_key():
    dit_like = random_official_state_dict(**NANO)
    dit_like["x_embedder.proj.weight"] = dit_like.pop("patch_embed.proj.weight")

    with pytest.raises(ValueError, match=r"patch_embed\.proj\.weight.*facebookresearch/mae"):
        convert_mae_state_dict(dit_like)


@pytest.mark.parametrize("key", ["blocks.1.mlp.fc2.bias", "decoder_blocks.0.attn.qkv.weight", "mask_token"])
def test_missing_tensor_is_named(key):
    sd = random_official_state_dict(**NANO)
    del sd[key]

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        convert_mae_state_dict(sd)


def test_unexpected_and_misshaped_tensors_are_named():
    sd = random_official_state_dict(**NANO)
    sd["dist_token"] = torch.zeros(1, 1, 32)  # a classifier head.* is dropped (a probe's), anything else is named
    with pytest.raises(ValueError, match=r"unexpected key\(s\) dist_token"):
        convert_mae_state_dict(sd)

    sd = random_official_state_dict(**NANO)
    sd["decoder_pred.weight"] = torch.zeros(5, 16)
    with pytest.raises(ValueError, match=r"decoder_pred\.weight \(5, 16\) \(expected \(4, 16\)\)"):
        convert_mae_state_dict(sd)


def test_wrong_positions_are_rejected():
    sd = random_official_state_dict(**NANO)
    sd["decoder_pos_embed"] = sd["decoder_pos_embed"].flip(1)

    with pytest.raises(ValueError, match="decoder_pos_embed"):
        convert_mae_state_dict(sd)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "absent" / "mae_pretrain_vit_base.pth"

    with pytest.raises(FileNotFoundError) as raised:
        load_official_mae(path)
    assert str(path) in str(raised.value)
