"""maskdiff's MDT/MDTv2 computes what sail-sg/MDT's models.py computes, from an official-layout state dict.

The reference below is written from the official code's semantics with plain tensor ops only (conv patch
embedding, BEiT relative position bias, side-interpolater with the masked shortcut, v2 long skips and dense
input shortcut, unpatchify) and never calls maskdiff.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiff.backbones.patching import Patchifier
from maskdiff.convert.mdt import load_official_mdt
from maskdiff.corruption.masking import masking_from_noise

C, P, SIDE, D, HEADS = 4, 2, 4, 32, 4


def sincos(dim, side):
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    grid_w, grid_h = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
    parts = []
    for grid in (grid_w, grid_h):
        out = np.outer(grid.reshape(-1), omega)
        parts += [np.sin(out), np.cos(out)]
    return torch.tensor(np.concatenate(parts, 1), dtype=torch.float32)[None]


def beit_index(side):
    index = torch.zeros(side * side, side * side, dtype=torch.long)
    for i in range(side * side):
        for j in range(side * side):
            dh, dw = i // side - j // side + side - 1, i % side - j % side + side - 1
            index[i, j] = dh * (2 * side - 1) + dw
    return index


def block_weights(prefix, skip, generator):
    r = lambda *shape: torch.randn(*shape, generator=generator) * 0.2  # noqa: E731
    weights = {
        f"{prefix}.attn.qkv.weight": r(3 * D, D), f"{prefix}.attn.qkv.bias": r(3 * D),
        f"{prefix}.attn.proj.weight": r(D, D), f"{prefix}.attn.proj.bias": r(D),
        f"{prefix}.attn.rel_pos_bias.relative_position_bias_table": r((2 * SIDE - 1) ** 2 + 3, HEADS),
        f"{prefix}.attn.rel_pos_bias.relative_position_index": beit_index(SIDE),
        f"{prefix}.mlp.fc1.weight": r(4 * D, D), f"{prefix}.mlp.fc1.bias": r(4 * D),
        f"{prefix}.mlp.fc2.weight": r(D, 4 * D), f"{prefix}.mlp.fc2.bias": r(D),
        f"{prefix}.adaLN_modulation.1.weight": r(6 * D, D), f"{prefix}.adaLN_modulation.1.bias": r(6 * D),
    }
    if skip:
        weights[f"{prefix}.skip_linear.weight"] = r(D, 2 * D)
        weights[f"{prefix}.skip_linear.bias"] = r(D)
    return weights


def official_state_dict(version, depth, decode_layer, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {
        "x_embedder.proj.weight": r(D, C, P, P), "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(num_classes + 1, D),
        "pos_embed": sincos(D, SIDE) + r(1, SIDE * SIDE, D), "decoder_pos_embed": sincos(D, SIDE) + r(1, SIDE * SIDE, D),
        "mask_token": r(1, 1, D),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
        "final_layer.linear.weight": r(P * P * 2 * C, D), "final_layer.linear.bias": r(P * P * 2 * C),
    }
    if version == 2:
        half = (depth - decode_layer) // 2
        for i in range(half):
            sd.update(block_weights(f"en_inblocks.{i}", False, g))
            sd.update(block_weights(f"en_outblocks.{i}", True, g))
        for i in range(decode_layer):
            sd.update(block_weights(f"de_blocks.{i}", True, g))
    else:
        for i in range(depth):
            sd.update(block_weights(f"blocks.{i}", False, g))
    sd.update(block_weights("sideblocks.0", False, g))
    return sd


def ref_block(sd, prefix, x, c, skip=None, ids_keep=None):
    if skip is not None:
        x = F.linear(torch.cat([x, skip], -1), sd[f"{prefix}.skip_linear.weight"], sd[f"{prefix}.skip_linear.bias"])
    mods = F.linear(F.silu(c), sd[f"{prefix}.adaLN_modulation.1.weight"], sd[f"{prefix}.adaLN_modulation.1.bias"]).chunk(6, 1)
    norm = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
    h = norm(x) * (1 + mods[1][:, None]) + mods[0][:, None]
    b, n, _ = h.shape
    qkv = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd[f"{prefix}.attn.qkv.bias"]).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
    attn = qkv[0] @ qkv[1].transpose(-2, -1) * (D // HEADS) ** -0.5
    table, index = sd[f"{prefix}.attn.rel_pos_bias.relative_position_bias_table"], sd[f"{prefix}.attn.rel_pos_bias.relative_position_index"]
    bias = table[index.view(-1)].view(SIDE**2, SIDE**2, -1).permute(2, 0, 1)
    if ids_keep is not None:
        bias = bias[None].repeat(b, 1, 1, 1)
        bias = torch.gather(bias, 2, ids_keep[:, None, :, None].repeat(1, HEADS, 1, SIDE**2))
        bias = torch.gather(bias, 3, ids_keep[:, None, None, :].repeat(1, HEADS, ids_keep.shape[1], 1))
    out = ((attn + bias).softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, D)
    x = x + mods[2][:, None] * F.linear(out, sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = norm(x) * (1 + mods[4][:, None]) + mods[3][:, None]
    h = F.linear(F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]), approximate="tanh"), sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])
    return x + mods[5][:, None] * h


def ref_forward(sd, version, depth, decode_layer, image, t, y, noise=None, mask_ratio=0.5):
    """The official forward; with ``noise`` the official masked pass (enable_mask) with that shuffle noise."""
    x = F.conv2d(image, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    input_skip, ids_keep = x, None
    if noise is not None:
        keep = int(x.shape[1] * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, 1)
        ids_restore = torch.argsort(ids_shuffle, 1)
        ids_keep = ids_shuffle[:, :keep]
        x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, D))
        mask = torch.ones_like(noise)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)

    def side_interpolater(x):
        tokens = torch.cat([x, sd["mask_token"].repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)], 1)
        x = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, D)) + sd["decoder_pos_embed"]
        before = x
        x = ref_block(sd, "sideblocks.0", x, c)
        return x * mask[..., None] + (1 - mask[..., None]) * before

    if version == 2:
        half, skips = (depth - decode_layer) // 2, []
        for i in range(half):
            x = ref_block(sd, f"en_inblocks.{i}", x, c, ids_keep=ids_keep)
            skips.append(x)
        for i in range(half):
            x = ref_block(sd, f"en_outblocks.{i}", x, c, skip=skips.pop(), ids_keep=ids_keep)
        x = side_interpolater(x) if noise is not None else x + sd["decoder_pos_embed"]
        for i in range(decode_layer):
            x = ref_block(sd, f"de_blocks.{i}", x, c, skip=input_skip)
    else:
        for i in range(depth):
            if i == depth - decode_layer:
                x = side_interpolater(x) if noise is not None else x + sd["decoder_pos_embed"]
                ids_keep = None
            x = ref_block(sd, f"blocks.{i}", x, c, ids_keep=ids_keep)
    mods = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, 1)
    x = F.layer_norm(x, (D,), eps=1e-6) * (1 + mods[1][:, None]) + mods[0][:, None]
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    x = x.reshape(x.shape[0], SIDE, SIDE, P, P, 2 * C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 2 * C, SIDE * P, SIDE * P)


def ours(model, image, t, y, masking=None):
    patchifier = Patchifier(SIDE * P, P, C)
    out = model(patchifier.patchify(image), t.float(), y, masking)
    eps, variance = out.split(patchifier.values_per_patch, -1)
    return torch.cat([patchifier.unpatchify(eps), patchifier.unpatchify(variance)], 1)


@pytest.mark.parametrize("version,depth,decode_layer", [(2, 4, 2), (2, 5, 1), (1, 3, 1)])
def test_official_layout_reproduces_outputs(tmp_path, version, depth, decode_layer):
    sd = official_state_dict(version, depth, decode_layer)
    torch.save(sd, tmp_path / "mdt.pt")
    model = load_official_mdt(tmp_path / "mdt.pt", decode_layer=None if version == 2 else decode_layer)
    assert type(model).__name__ == ("MDTv2" if version == 2 else "MDT") and model.decode_layer == decode_layer
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, C, SIDE * P, SIDE * P, generator=g)
    t, y = torch.tensor([0, 400, 999]), torch.tensor([0, 4, 5])  # 5 = the null class
    with torch.no_grad():
        torch.testing.assert_close(ours(model, image, t, y), ref_forward(sd, version, depth, decode_layer, image, t, y), rtol=1e-5, atol=1e-5)
        noise = torch.rand(3, SIDE * SIDE, generator=g)
        masking = masking_from_noise(noise, int(SIDE * SIDE * 0.5))
        torch.testing.assert_close(ours(model, image, t, y, masking),
                                   ref_forward(sd, version, depth, decode_layer, image, t, y, noise=noise), rtol=1e-5, atol=1e-5)


def test_mdt_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_official_mdt(tmp_path / "nowhere.pt")
    sd = official_state_dict(2, 4, 2)
    del sd["sideblocks.0.attn.qkv.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="sideblocks.0.attn.qkv.weight.*sail-sg/MDT"):
        load_official_mdt(tmp_path / "broken.pt")
    sd = official_state_dict(2, 4, 2)
    del sd["de_blocks.0.skip_linear.bias"]
    torch.save(sd, tmp_path / "broken2.pt")
    with pytest.raises(ValueError, match="missing key.*de_blocks.0.skip_linear.bias"):
        load_official_mdt(tmp_path / "broken2.pt")
