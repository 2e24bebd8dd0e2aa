"""Official DiT checkpoints load into maskdiff's DiT and compute the official function.

The reference below re-implements facebookresearch/DiT ``models.py`` functionally from an official-layout state
dict, with no maskdiff code, so a wrong layout conversion cannot cancel out against the backbone.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from maskdiff.backbones.dit import DIT_SIZES
from maskdiff.backbones.embeddings import sincos_2d
from maskdiff.convert.dit import convert_dit_state_dict, infer_dit_config, load_official_dit

TOLERANCE = 1e-5
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
NANO = dict(input_size=8, patch_size=4, in_channels=3, num_classes=5, **DIT_SIZES["Nano"])


# ---------------------------------------------------------------------------------------------- reference
def official_layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def official_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def official_adaln(sd: dict, prefix: str, c: torch.Tensor, chunks: int) -> tuple[torch.Tensor, ...]:
    weight, bias = sd[f"{prefix}.adaLN_modulation.1.weight"], sd[f"{prefix}.adaLN_modulation.1.bias"]
    return F.linear(F.silu(c), weight, bias).chunk(chunks, dim=1)


def official_timestep_embedding(sd: dict, t: torch.Tensor) -> torch.Tensor:
    """``t (B,)`` -> ``(B, D)``: 256-d [cos, sin] sinusoid, then Linear -> SiLU -> Linear."""
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    frequencies = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    hidden = F.silu(F.linear(frequencies, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"]))
    return F.linear(hidden, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])


def official_attention(sd: dict, prefix: str, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    qkv = F.linear(x, sd[f"{prefix}.qkv.weight"], sd[f"{prefix}.qkv.bias"])
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, sd[f"{prefix}.proj.weight"], sd[f"{prefix}.proj.bias"])


def official_mlp(sd: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"]), approximate="tanh")
    return F.linear(hidden, sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"])


def official_dit_forward(
    sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, patch_size: int, num_heads: int
) -> torch.Tensor:
    """facebookresearch/DiT ``DiT.forward``: ``x (B, C, H, W)``, ``t (B,)``, ``y (B,)`` -> ``(B, out_C, H, W)``."""
    p = patch_size
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    c = official_timestep_embedding(sd, t) + sd["y_embedder.embedding_table.weight"][y]

    depth = sum(1 for key in sd if key.endswith(".adaLN_modulation.1.weight") and key.startswith("blocks."))
    for i in range(depth):
        block = f"blocks.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = official_adaln(sd, block, c, 6)
        attention_input = official_modulate(official_layer_norm(tokens), shift_msa, scale_msa)
        tokens = tokens + gate_msa.unsqueeze(1) * official_attention(sd, f"{block}.attn", attention_input, num_heads)
        mixed = official_mlp(sd, f"{block}.mlp", official_modulate(official_layer_norm(tokens), shift_mlp, scale_mlp))
        tokens = tokens + gate_mlp.unsqueeze(1) * mixed

    shift, scale = official_adaln(sd, "final_layer", c, 2)
    final_input = official_modulate(official_layer_norm(tokens), shift, scale)
    out = F.linear(final_input, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])

    out_channels = out.shape[-1] // (p * p)
    side = int(out.shape[1] ** 0.5)
    out = out.reshape(out.shape[0], side, side, p, p, out_channels)
    out = torch.einsum("nhwpqc->nchpwq", out)
    return out.reshape(out.shape[0], out_channels, side * p, side * p)


# ---------------------------------------------------------------------------------------------- fixtures
def random_official_state_dict(
    input_size: int,
    patch_size: int,
    in_channels: int,
    hidden_size: int,
    depth: int,
    num_heads: int,
    num_classes: int,
    learn_sigma: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """An official-layout DiT state dict with non-zero random values in every tensor."""
    generator = torch.Generator().manual_seed(seed)
    d, p, c = hidden_size, patch_size, in_channels
    out_channels = 2 * c if learn_sigma else c

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        weight = torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        bias = 0.1 * torch.randn(out_features, generator=generator)
        return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}

    sd = {
        "x_embedder.proj.weight": torch.randn(d, c, p, p, generator=generator) / math.sqrt(c * p * p),
        "x_embedder.proj.bias": 0.1 * torch.randn(d, generator=generator),
        "pos_embed": torch.from_numpy(sincos_2d(d, input_size // p)).float().unsqueeze(0),
        "y_embedder.embedding_table.weight": torch.randn(num_classes + 1, d, generator=generator),
        **linear("t_embedder.mlp.0", d, 256),
        **linear("t_embedder.mlp.2", d, d),
    }
    for i in range(depth):
        sd |= linear(f"blocks.{i}.attn.qkv", 3 * d, d)
        sd |= linear(f"blocks.{i}.attn.proj", d, d)
        sd |= linear(f"blocks.{i}.mlp.fc1", 4 * d, d)
        sd |= linear(f"blocks.{i}.mlp.fc2", d, 4 * d)
        sd |= linear(f"blocks.{i}.adaLN_modulation.1", 6 * d, d)
    sd |= linear("final_layer.adaLN_modulation.1", 2 * d, d)
    sd |= linear("final_layer.linear", p * p * out_channels, d)
    return sd


def maskdiff_image_output(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """patchify -> backbone -> per-part unpatchify -> concat on channels: ``(B, parts*C, H, W)``."""
    patchifier = model.patchifier
    with torch.no_grad():
        out = model(patchifier.patchify(x), t, y)
    parts = out.chunk(model.output_parts, dim=-1)
    return torch.cat([patchifier.unpatchify(part) for part in parts], dim=1)


def assert_matches_official(model, sd: dict, config: dict, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    size, channels = config["input_size"], config["in_channels"]
    x = torch.randn(4, channels, size, size, generator=generator)
    for t, y in (
        (torch.tensor([0, 1, 500, 999]), torch.tensor([0, 1, 2, 3])),
        (torch.tensor([999, 250, 42, 7]), torch.tensor([config["num_classes"], 4, 0, config["num_classes"] - 1])),
    ):
        expected = official_dit_forward(sd, x, t, y, config["patch_size"], config["num_heads"])
        actual = maskdiff_image_output(model, x, t, y)
        assert actual.shape == expected.shape
        error = (actual - expected).abs().max().item()
        assert error <= TOLERANCE, f"max |maskdiff - official| = {error:.3g}"


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_loaded_checkpoint_matches_official_forward(tmp_path, learn_sigma):
    torch.manual_seed(0)
    sd = random_official_state_dict(**SMALL, learn_sigma=learn_sigma)
    path = tmp_path / "dit.pt"
    torch.save(sd, path)

    model = load_official_dit(str(path), num_heads=SMALL["num_heads"])

    assert not model.training
    assert model.output_parts == (2 if learn_sigma else 1)
    assert_matches_official(model, sd, SMALL)


def test_num_heads_comes_from_dit_sizes(tmp_path):
    sd = random_official_state_dict(**NANO, seed=3)
    path = tmp_path / "nano.pt"
    torch.save(sd, path)

    model = load_official_dit(path)

    assert model.blocks[0].attn.num_heads == DIT_SIZES["Nano"]["num_heads"]
    assert_matches_official(model, sd, NANO)


def test_infer_config_reads_shapes():
    sd = random_official_state_dict(**SMALL, learn_sigma=False)

    config = infer_dit_config(sd, num_heads=4)

    assert config == dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        num_classes=10,
        class_dropout_prob=0.1,
        learn_sigma=False,
    )


def test_training_checkpoint_uses_ema_weights(tmp_path):
    ema = random_official_state_dict(**SMALL, seed=5)
    raw = random_official_state_dict(**SMALL, seed=6)
    optimizer_model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(optimizer_model.parameters())
    optimizer_model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": {f"module.{key}": value for key, value in raw.items()},
        "ema": {f"module.{key}": value for key, value in ema.items()},
        "opt": optimizer.state_dict(),
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256, ckpt=None),
    }
    path = tmp_path / "0050000.pt"
    torch.save(checkpoint, path)

    model = load_official_dit(path, num_heads=SMALL["num_heads"])

    assert_matches_official(model, ema, SMALL)


def test_missing_num_heads_is_explained():
    sd = random_official_state_dict(**SMALL)

    with pytest.raises(ValueError, match="num_heads"):
        convert_dit_state_dict(sd)


def test_non_dit_state_dict_names_missing_key():
    mae_like = random_official_state_dict(**SMALL)
    mae_like["patch_embed.proj.weight"] = mae_like.pop("x_embedder.proj.weight")

    with pytest.raises(ValueError, match=r"x_embedder\.proj\.weight.*facebookresearch/DiT"):
        convert_dit_state_dict(mae_like, num_heads=4)


def test_missing_block_tensor_is_named():
    sd = random_official_state_dict(**SMALL)
    del sd["blocks.1.mlp.fc2.bias"]

    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        convert_dit_state_dict(sd, num_heads=4)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "absent" / "DiT-XL-2-256x256.pt"

    with pytest.raises(FileNotFoundError, match="DiT-XL-2-256x256.pt") as raised:
        load_official_dit(str(path))
    assert str(path) in str(raised.value)


def test_wrong_pos_embed_values_are_rejected():
    sd = random_official_state_dict(**SMALL)
    sd["pos_embed"] = sd["pos_embed"].flip(1)

    with pytest.raises(ValueError, match="pos_embed"):
        convert_dit_state_dict(sd, num_heads=4)
