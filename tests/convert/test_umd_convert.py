"""``maskdiff convert umd`` computes the official big_vision UMD function (philippe-eecs/small-vision ``models/ae.py``).

The official JAX model's outputs at a small size (tests/fixtures/official, with its README) are reproduced through the
command, with and without the ``params/`` prefix and in the ``scan=True`` layout; other sizes are checked against
:func:`official_forward`, the official forward written here in plain torch on the flax param tree (no maskdiff code),
so a layout bug in the importer cannot cancel out.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.convert.umd import convert_umd_params
from maskdiff.corruption import random_masking
from maskdiff.methods import UMD
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "umd_small_official.npz"
OUT_TOLERANCE = 2e-6
# The t = 1000 row's register mean is the most sensitive output: the float32 sinusoid of t = 1000 alone moves it by
# ~8e-6 of its scale (a float64 evaluation of the same formula differs from the JAX float32 output as much).
PRE_LOGITS_TOLERANCE = 3e-5


def fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as archive:
        return {key: archive[key] for key in archive.files}


def params_of(arrays: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + key.removeprefix("params/"): value for key, value in arrays.items() if key.startswith("params/")}


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def scanned(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``scan=True`` layout: each part's ``Encoder1DBlock_i`` tensors stacked on a leading depth axis."""
    stacked, blocks = {}, {}
    for key, value in params.items():
        found = re.fullmatch(r"(.*)/Encoder1DBlock_(\d+)/(.*)", key)
        if found:
            part, index, rest = found.groups()
            blocks.setdefault(f"{part}/ScanCheckpointEncoder1DBlock_0/{rest}", {})[int(index)] = value
        else:
            stacked[key] = value
    for key, by_index in blocks.items():
        stacked[key] = np.stack([by_index[index] for index in range(len(by_index))])
    return stacked


# ---------------------------------------------------------------------------------------------- official forward
def _dense(x, p, name):
    return x @ p[f"{name}/kernel"] + p[f"{name}/bias"]


def _layer_norm(x, p, name):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _attention(x, p, name):
    q, k, v = (torch.einsum("bnd,dhk->bnhk", x, p[f"{name}/{w}/kernel"]) + p[f"{name}/{w}/bias"] for w in ("query", "key", "value"))
    weights = torch.einsum("bqhk,bshk->bhqs", q / math.sqrt(q.shape[-1]), k).softmax(-1)
    return torch.einsum("bhqs,bshk,hkd->bqd", weights, v, p[f"{name}/out/kernel"]) + p[f"{name}/out/bias"]


def _block(x, c, p, name):
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (m[:, None] for m in _dense(c, p, f"{name}/Dense_0").chunk(6, -1))
    h = _layer_norm(x, p, f"{name}/LayerNorm_0") * (1 + scale_a) + shift_a
    x = x + gate_a * _attention(h, p, f"{name}/MultiHeadDotProductAttention_0")
    h = _layer_norm(x, p, f"{name}/LayerNorm_1") * (1 + scale_m) + shift_m
    h = _dense(F.gelu(_dense(h, p, f"{name}/MlpBlock_0/Dense_0"), approximate="tanh"), p, f"{name}/MlpBlock_0/Dense_1")
    return x + gate_m * h


def _trunk(x, p, name):
    return _dense(F.silu(_dense(x, p, f"{name}/Dense_0")), p, f"{name}/Dense_1")


def _run(x, c, p, part):
    index = 0
    while f"{part}/Encoder1DBlock_{index}/Dense_0/kernel" in p:
        x = _block(x, c, p, f"{part}/Encoder1DBlock_{index}")
        index += 1
    return _layer_norm(x, p, f"{part}/encoder_norm")


def official_forward(params, image, t, y=None, keep=None, restore=None):
    """``_ViTAE(adaln=True)`` on flax params (float64): ``image (B, H, W, C)``, model time ``t (B,)`` (0 = clean), labels
    ``y``, MAE masking given as ``keep (B, K)`` / ``restore (B, N)`` -> ``(pred (B, H, W, 2C), pre_logits (B, D))``."""
    p = {key: torch.tensor(value, dtype=torch.float64) for key, value in params.items()}
    batch, side, _, channels = image.shape
    kernel = p["embedding/kernel"]
    patch, width, registers = kernel.shape[0], kernel.shape[-1], p["cls"].shape[1]
    grid = side // patch
    patches = image.double().reshape(batch, grid, patch, grid, patch, channels).transpose(2, 3)
    patches = patches.reshape(batch, grid * grid, patch, patch, channels)
    x = torch.einsum("znabc,abcd->znd", patches, kernel) + p["embedding/bias"] + p["pos_embedding"]
    if keep is not None:
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, width))
    x = torch.cat([p["cls"].expand(batch, -1, -1), x], 1)
    half = width // 2
    angles = t.double()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    c = _trunk(torch.cat([angles.sin(), angles.cos()], -1), p, "time_trunk")
    if "label_emb/embedding/embedding" in p:
        c = c + _trunk(p["label_emb/embedding/embedding"][y], p, "label_trunk")
    c = F.silu(c)
    x = _run(x, c, p, "Encoder")
    representation, tokens = x[:, :registers].mean(1), x[:, registers:]
    if keep is not None:
        hidden = p["image_mask_embedding"].expand(batch, grid * grid - tokens.shape[1], -1)
        tokens = torch.gather(torch.cat([tokens, hidden], 1), 1, restore[..., None].expand(-1, -1, width))
    z = torch.cat([representation[:, None], tokens + p["dec_pos_embedding"]], 1)
    z = _run(z, c, p, "Decoder")[:, 1:]
    shift, scale = _dense(c, p, "final_modulation").chunk(2, -1)
    z = z * (1 + scale[:, None]) + shift[:, None]
    out = torch.einsum("znd,abdo->znabo", z, p["final_conv/kernel"].flip(0, 1)) + p["final_conv/bias"]
    out = out.reshape(batch, grid, grid, patch, patch, -1).transpose(2, 3).reshape(batch, side, side, -1)
    return out, representation


def random_official_params(seed, side, patch, channels, width, depth, decoder_depth, heads, mlp, registers, classes):
    """A flax param tree of the official layout (unstacked), every tensor random."""
    rng = np.random.default_rng(seed)
    tokens, head_dim = (side // patch) ** 2, width // heads
    shapes = {
        "embedding/kernel": (patch, patch, channels, width), "embedding/bias": (width,), "cls": (1, registers, width),
        "pos_embedding": (1, tokens, width), "dec_pos_embedding": (1, tokens, width), "image_mask_embedding": (1, 1, width),
        "final_modulation/kernel": (width, 2 * width), "final_modulation/bias": (2 * width,),
        "final_conv/kernel": (patch, patch, width, 2 * channels), "final_conv/bias": (2 * channels,),
    }
    for trunk in ("time_trunk", "label_trunk") if classes else ("time_trunk",):
        shapes |= {f"{trunk}/Dense_0/kernel": (width, 2 * width), f"{trunk}/Dense_0/bias": (2 * width,),
                   f"{trunk}/Dense_1/kernel": (2 * width, width), f"{trunk}/Dense_1/bias": (width,)}
    if classes:
        shapes["label_emb/embedding/embedding"] = (classes + 1, width)
    for part, count in (("Encoder", depth), ("Decoder", decoder_depth)):
        shapes |= {f"{part}/encoder_norm/scale": (width,), f"{part}/encoder_norm/bias": (width,)}
        for index in range(count):
            block = f"{part}/Encoder1DBlock_{index}"
            shapes |= {f"{block}/Dense_0/kernel": (width, 6 * width), f"{block}/Dense_0/bias": (6 * width,),
                       f"{block}/MlpBlock_0/Dense_0/kernel": (width, mlp), f"{block}/MlpBlock_0/Dense_0/bias": (mlp,),
                       f"{block}/MlpBlock_0/Dense_1/kernel": (mlp, width), f"{block}/MlpBlock_0/Dense_1/bias": (width,)}
            for norm in ("LayerNorm_0", "LayerNorm_1"):
                shapes |= {f"{block}/{norm}/scale": (width,), f"{block}/{norm}/bias": (width,)}
            for name in ("query", "key", "value"):
                shapes |= {f"{block}/MultiHeadDotProductAttention_0/{name}/kernel": (width, heads, head_dim),
                           f"{block}/MultiHeadDotProductAttention_0/{name}/bias": (heads, head_dim)}
            shapes |= {f"{block}/MultiHeadDotProductAttention_0/out/kernel": (heads, head_dim, width),
                       f"{block}/MultiHeadDotProductAttention_0/out/bias": (width,)}
    params = {}
    for key, shape in shapes.items():
        scale = 1 / math.sqrt(shape[0]) if key.endswith("kernel") and len(shape) > 1 else 0.3
        params[key] = (rng.standard_normal(shape) * scale + (key.endswith("scale"))).astype(np.float32)
    return params


def maskdiff_forward(backbone, image, t, y=None, masking=None):
    """maskdiff's outputs in the official layout: ``image (B, H, W, C)`` -> ``(pred (B, H, W, 2C), pre_logits)``."""
    tokens = backbone.patchifier.patchify(image.permute(0, 3, 1, 2))
    with torch.no_grad():
        x0, eps = backbone(tokens, t.float(), y, masking).chunk(2, dim=-1)
        features = backbone.forward_features(tokens, t.float(), y, masking)[:, : backbone.num_prefix_tokens].mean(1)
    pred = torch.cat([backbone.patchifier.unpatchify(x0), backbone.patchifier.unpatchify(eps)], dim=1)
    return pred.permute(0, 2, 3, 1), features


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout", ["params/", "bare", "scan"])
def test_convert_reproduces_the_official_model(tmp_path, capsys, layout):
    arrays = fixture()
    params = scanned(params_of(arrays, "params/")) if layout == "scan" else params_of(arrays, "params/" if layout == "params/" else "")
    np.savez(tmp_path / "umd.npz", **params)
    main(["convert", "umd", str(tmp_path / "umd.npz"), str(tmp_path / "umd.ckpt")])
    assert "UMD (depth 2+1, width 64, patch 4, input 16, 10 classes)" in capsys.readouterr().out
    module = load_method(tmp_path / "umd.ckpt")
    assert type(module) is UMD and module.clip_x0 == 1.0 and module.corruption.schedule.schedule == "cosine"
    backbone = module.backbone.eval()
    pred, pre_logits = maskdiff_forward(backbone, torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["t"][:, 0]),
                                        torch.from_numpy(arrays["y"]).long())
    out_error = max_relative_error(pred, torch.from_numpy(arrays["out"]))
    pre_logits_error = max_relative_error(pre_logits, torch.from_numpy(arrays["pre_logits"]))
    assert out_error < OUT_TOLERANCE and pre_logits_error < PRE_LOGITS_TOLERANCE, (out_error, pre_logits_error)


def test_converted_class_conditional_model_samples_with_its_stored_guidance(tmp_path, capsys):
    np.savez(tmp_path / "umd.npz", **params_of(fixture()))
    main(["convert", "umd", str(tmp_path / "umd.npz"), str(tmp_path / "umd.ckpt"), "--cfg_scale", "2.0"])
    module = load_method(tmp_path / "umd.ckpt")
    assert module.guidance.scale == 2.0 and module.guidance.channels is None  # all output channels, as the official
    main(["sample", "--ckpt", str(tmp_path / "umd.ckpt"), "--out", str(tmp_path / "grid.png"), "--steps", "2",
          "--classes", "[0,1]", "--per_class", "1"])
    assert "cfg 2.0" in capsys.readouterr().out and (tmp_path / "grid.png").is_file()


def test_the_test_forward_is_the_official_function():
    arrays = fixture()
    out, pre_logits = official_forward(params_of(arrays), torch.from_numpy(arrays["image"]), torch.from_numpy(arrays["t"][:, 0]),
                                       torch.from_numpy(arrays["y"]).long())
    assert max_relative_error(out, torch.from_numpy(arrays["out"])) < OUT_TOLERANCE
    assert max_relative_error(pre_logits, torch.from_numpy(arrays["pre_logits"])) < PRE_LOGITS_TOLERANCE


def test_stacked_and_unstacked_layouts_convert_to_the_same_weights():
    params = params_of(fixture())
    unstacked, config = convert_umd_params(params)
    stacked, stacked_config = convert_umd_params(scanned(params))
    assert config == stacked_config and unstacked.keys() == stacked.keys()
    assert all(torch.equal(unstacked[key], stacked[key]) for key in unstacked)


SIZES = [
    dict(side=8, patch=2, channels=1, width=32, depth=1, decoder_depth=2, heads=2, mlp=64, registers=1, classes=0),
    dict(side=12, patch=3, channels=4, width=48, depth=3, decoder_depth=1, heads=3, mlp=96, registers=2, classes=5),
    dict(side=16, patch=8, channels=3, width=40, depth=2, decoder_depth=2, heads=5, mlp=160, registers=4, classes=3),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size['side']}p{size['patch']}c{size['channels']}d{size['width']}")
@pytest.mark.parametrize("scan", [False, True])
def test_other_sizes_match_the_official_forward(size, scan):
    params = random_official_params(seed=size["side"], **size)
    state_dict, config = convert_umd_params(scanned(params) if scan else params)
    assert (config["depth"], config["decoder_depth"], config["num_heads"], config["num_registers"]) == (
        size["depth"], size["decoder_depth"], size["heads"], size["registers"])
    assert (config["input_size"], config["mlp_ratio"], config["num_classes"]) == (
        size["side"], size["mlp"] / size["width"], size["classes"])
    backbone = UMDBackbone(**config)
    backbone.load_state_dict(state_dict, strict=True)
    backbone.eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, size["side"], size["side"], size["channels"], generator=generator)
    t = torch.tensor([0, 37, 1000])
    y = torch.tensor([0, size["classes"] - 1, size["classes"]]) if size["classes"] else None
    expected = official_forward(params, image, t, y)
    ours = maskdiff_forward(backbone, image, t, y)
    for got, want in zip(ours, expected):
        assert max_relative_error(got, want) < 5e-5
    masking = random_masking(3, (size["side"] // size["patch"]) ** 2, 0.5, generator=generator)
    expected = official_forward(params, image, t, y, masking.ids_keep, masking.ids_restore)
    ours = maskdiff_forward(backbone, image, t, y, masking)
    for got, want in zip(ours, expected):
        assert max_relative_error(got, want) < 5e-5


def one_line_error(params) -> str:
    with pytest.raises(ValueError) as error:
        convert_umd_params(params)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_unknown_missing_and_misshapen_keys_are_one_line_errors_naming_them():
    params = params_of(fixture())
    extra = {"opt/mu": np.zeros(1), "Encoder/extra/kernel": np.zeros(1)}
    assert "unknown key(s) Encoder/extra/kernel, opt/mu" in one_line_error({**params, **extra})
    prefixed = params_of(fixture(), "params/")
    assert "unknown key(s) step outside params/" in one_line_error({**prefixed, "step": np.zeros(())})
    missing = {key: value for key, value in params.items() if key not in ("Decoder/encoder_norm/scale", "final_modulation/bias")}
    assert "missing key(s) Decoder/encoder_norm/scale, final_modulation/bias" in one_line_error(missing)
    gap = {key: value for key, value in params.items() if not key.startswith("Encoder/Encoder1DBlock_0/")}
    assert "missing key(s) Encoder/Encoder1DBlock_0/Dense_0/bias" in one_line_error(gap)
    assert "missing key(s) embedding/kernel" in one_line_error({k: v for k, v in params.items() if k != "embedding/kernel"})
    misshapen = {**params, "final_conv/bias": np.zeros(5, np.float32)}
    assert "shape mismatch for final_conv/bias (5,) (expected (6,))" in one_line_error(misshapen)
    stacked = scanned(params)
    stacked["Encoder/ScanCheckpointEncoder1DBlock_0/Dense_0/bias"] = stacked["Encoder/ScanCheckpointEncoder1DBlock_0/Dense_0/bias"][:1]
    assert "different leading depth axes [1, 2]" in one_line_error(stacked)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="UMD checkpoint not found"):
        main(["convert", "umd", str(tmp_path / "absent.npz"), str(tmp_path / "umd.ckpt")])
