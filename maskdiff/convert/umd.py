"""Import big_vision UMD checkpoints (philippe-eecs/small-vision ``models/ae.py:_ViTAE``, ``adaln=True``) into
maskdiff's :class:`~maskdiff.backbones.UMD`.

A big_vision params checkpoint is an ``.npz`` whose keys are the flax param paths joined by ``/``, with or without a
leading ``params/``. The blocks are ``Encoder1DBlock_i`` subtrees or, with ``scan=True``, one
``ScanCheckpointEncoder1DBlock_0`` subtree per ``Encoder``/``Decoder`` whose tensors carry a leading ``depth`` axis.
The sizes are read from the shapes; the layouts change as follows (the function stays the official one):

* Dense kernels ``(in, out)`` -> Linear weights ``(out, in)``;
* the patch-embedding Conv kernel ``(p, p, C, D)`` (HWIO) -> a Linear over tokens in (p_row, p_col, channel) order;
* attention query/key/value kernels ``(D, heads, head_dim)`` and biases ``(heads, head_dim)`` -> one fused ``qkv``
  Linear; the out kernel ``(heads, head_dim, D)`` -> ``proj``;
* the ``ConvTranspose`` output kernel ``(p, p, D, 2C)``, which flax applies spatially flipped (kernel = stride = p),
  -> per-token Linear rows ``[x0 tokens ‖ ε tokens]``, each (p_row, p_col, channel);
* the decoder's own final ``encoder_norm`` -> ``head.norm`` (``final_norm_affine=True``) and ``final_modulation``
  -> ``head.adaLN_modulation``; the conditioning trunks, register (``cls``) tokens, mask embedding and positions keep
  their roles. Time inputs need no change: the official model time 0 is "noise-free", as maskdiff's backbone's.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import numpy as np
import torch

from maskdiff.backbones.umd import UMD
from maskdiff.convert.layout import check_keys_and_shapes, meta_shapes

OFFICIAL_UMD_URL = "https://github.com/philippe-eecs/small-vision"
SCAN_BLOCK = "ScanCheckpointEncoder1DBlock_0"
PARTS = ("Encoder", "Decoder")
OFFICIAL_CLASS_DROPOUT_PROB = 0.1


def _not_a_umd(reason: str) -> ValueError:
    return ValueError(f"{reason}; expected a big_vision UMD params checkpoint ({OFFICIAL_UMD_URL}, models/ae.py, adaln=True)")


def _listed(keys) -> str:
    return ", ".join(sorted(keys))


def strip_params_prefix(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys without the leading ``params/`` of a training checkpoint; when one key has it, all must."""
    prefixed = [key for key in flat if key.startswith("params/")]
    if not prefixed:
        return dict(flat)
    outside = [key for key in flat if not key.startswith("params/")]
    if outside:
        raise _not_a_umd(f"unknown key(s) {_listed(outside)} outside params/")
    return {key.removeprefix("params/"): value for key, value in flat.items()}


def unstack_scanned(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``scan=True`` layout -> unstacked: ``{Part}/ScanCheckpointEncoder1DBlock_0/...`` tensors ``(depth, ...)`` become
    ``{Part}/Encoder1DBlock_{i}/...`` tensors ``(...)``; other keys are kept."""
    unstacked = {}
    for key, value in params.items():
        part, _, rest = key.partition(f"/{SCAN_BLOCK}/")
        if not rest:
            unstacked[key] = value
            continue
        if any(name.startswith(f"{part}/Encoder1DBlock_") for name in params):
            raise _not_a_umd(f"{part} holds both {SCAN_BLOCK} (scan=True) and unstacked Encoder1DBlock_i blocks")
        depths = {params[name].shape[0] for name in params if name.startswith(f"{part}/{SCAN_BLOCK}/")}
        if len(depths) != 1:
            raise _not_a_umd(f"the tensors of {part}/{SCAN_BLOCK} have different leading depth axes {sorted(depths)}")
        for index in range(value.shape[0]):
            unstacked[f"{part}/Encoder1DBlock_{index}/{rest}"] = value[index]
    return unstacked


def load_big_vision_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a big_vision ``.npz`` checkpoint by their ``/``-joined keys, as saved."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"UMD checkpoint not found: {os.fspath(path)!r}")
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _count_blocks(params: Mapping[str, np.ndarray], part: str) -> int:
    pattern = re.compile(rf"^{part}/Encoder1DBlock_(\d+)/")
    indices = {int(match.group(1)) for key in params if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _require(params: Mapping[str, np.ndarray], *keys: str) -> None:
    missing = [key for key in keys if key not in params]
    if missing:
        raise _not_a_umd(f"missing key(s) {_listed(missing)}")


def _block_shapes(prefix: str, width: int, heads: int, head_dim: int, mlp: int) -> dict[str, tuple]:
    shapes = {f"{prefix}/Dense_0/kernel": (width, 6 * width), f"{prefix}/Dense_0/bias": (6 * width,),
              f"{prefix}/MlpBlock_0/Dense_0/kernel": (width, mlp), f"{prefix}/MlpBlock_0/Dense_0/bias": (mlp,),
              f"{prefix}/MlpBlock_0/Dense_1/kernel": (mlp, width), f"{prefix}/MlpBlock_0/Dense_1/bias": (width,)}
    for norm in ("LayerNorm_0", "LayerNorm_1"):
        shapes |= {f"{prefix}/{norm}/scale": (width,), f"{prefix}/{norm}/bias": (width,)}
    attention = f"{prefix}/MultiHeadDotProductAttention_0"
    for name in ("query", "key", "value"):
        shapes |= {f"{attention}/{name}/kernel": (width, heads, head_dim), f"{attention}/{name}/bias": (heads, head_dim)}
    return shapes | {f"{attention}/out/kernel": (heads, head_dim, width), f"{attention}/out/bias": (width,)}


def official_shapes(config: Mapping) -> dict[str, tuple]:
    """The flax param shapes of the official model of :class:`UMD` init args ``config`` (``adaln=True``, unstacked)."""
    width, patch, channels = config["hidden_size"], config["patch_size"], config["in_channels"]
    tokens = (config["input_size"] // patch) ** 2
    heads = config["num_heads"]
    mlp = round(width * config["mlp_ratio"])
    shapes = {
        "embedding/kernel": (patch, patch, channels, width), "embedding/bias": (width,),
        "pos_embedding": (1, tokens, width), "dec_pos_embedding": (1, tokens, width),
        "cls": (1, config["num_registers"], width), "image_mask_embedding": (1, 1, width),
        "final_modulation/kernel": (width, 2 * width), "final_modulation/bias": (2 * width,),
        "final_conv/kernel": (patch, patch, width, 2 * channels), "final_conv/bias": (2 * channels,),
    }
    trunks = ["time_trunk"]
    if config["num_classes"]:
        shapes["label_emb/embedding/embedding"] = (config["num_classes"] + 1, width)
        trunks.append("label_trunk")
    for trunk in trunks:
        shapes |= {f"{trunk}/Dense_0/kernel": (width, 2 * width), f"{trunk}/Dense_0/bias": (2 * width,),
                   f"{trunk}/Dense_1/kernel": (2 * width, width), f"{trunk}/Dense_1/bias": (width,)}
    for part, depth in zip(PARTS, (config["depth"], config["decoder_depth"])):
        shapes |= {f"{part}/encoder_norm/scale": (width,), f"{part}/encoder_norm/bias": (width,)}
        for index in range(depth):
            shapes |= _block_shapes(f"{part}/Encoder1DBlock_{index}", width, heads, width // heads, mlp)
    return shapes


def infer_umd_config(params: Mapping[str, np.ndarray]) -> dict:
    """:class:`UMD` init args read from the shapes of flat, unstacked official params; every key must be one the
    inferred model has, with its shape (else a one-line ``ValueError`` naming the keys)."""
    _require(params, "embedding/kernel", "pos_embedding", "cls")
    patch, patch_w, channels, width = params["embedding/kernel"].shape
    tokens = params["pos_embedding"].shape[1]
    grid = math.isqrt(tokens)
    if patch != patch_w or grid * grid != tokens:
        raise _not_a_umd(f"embedding/kernel {params['embedding/kernel'].shape} and pos_embedding "
                         f"{params['pos_embedding'].shape} are not a square patch embedding of a square grid")
    depth, decoder_depth = _count_blocks(params, "Encoder"), _count_blocks(params, "Decoder")
    blocks = sorted({match.group(1) for key in params if (match := re.match(r"((Encoder|Decoder)/Encoder1DBlock_\d+)/", key))})
    first = blocks[0] if blocks else "Encoder/Encoder1DBlock_0"
    _require(params, f"{first}/MultiHeadDotProductAttention_0/query/kernel", f"{first}/MlpBlock_0/Dense_0/kernel")
    _, heads, head_dim = params[f"{first}/MultiHeadDotProductAttention_0/query/kernel"].shape
    if heads * head_dim != width:
        raise _not_a_umd(f"attention of {heads} heads x {head_dim} is not as wide as the model ({width}); maskdiff's "
                         "attention needs qkv_features = width")
    table = params.get("label_emb/embedding/embedding")
    config = dict(
        input_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width, depth=depth,
        num_heads=heads, decoder_depth=decoder_depth,
        mlp_ratio=params[f"{first}/MlpBlock_0/Dense_0/kernel"].shape[1] / width,
        num_registers=params["cls"].shape[1], num_classes=table.shape[0] - 1 if table is not None else 0,
        class_dropout_prob=OFFICIAL_CLASS_DROPOUT_PROB, adaln=True, label_embedding_std=None, final_norm_affine=True,
    )
    expected = official_shapes(config)
    unknown = set(params) - set(expected)
    if unknown:
        raise _not_a_umd(f"unknown key(s) {_listed(unknown)}")
    missing = set(expected) - set(params)
    if missing:
        raise _not_a_umd(f"missing key(s) {_listed(missing)}")
    mismatched = [f"{key} {tuple(params[key].shape)} (expected {shape})" for key, shape in expected.items()
                  if tuple(params[key].shape) != shape]
    if mismatched:
        raise _not_a_umd(f"shape mismatch for {', '.join(mismatched)}")
    return config


def _linear(params: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    return {f"{target}.weight": params[f"{source}/kernel"].T, f"{target}.bias": params[f"{source}/bias"]}


def _norm(params: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    return {f"{target}.weight": params[f"{source}/scale"], f"{target}.bias": params[f"{source}/bias"]}


def _block(params: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    attention = f"{source}/MultiHeadDotProductAttention_0"
    qkv = [params[f"{attention}/{name}/kernel"].flatten(1) for name in ("query", "key", "value")]
    out = params[f"{attention}/out/kernel"]
    return {
        **_norm(params, f"{source}/LayerNorm_0", f"{target}.norm1"),
        **_norm(params, f"{source}/LayerNorm_1", f"{target}.norm2"),
        f"{target}.attn.qkv.weight": torch.cat(qkv, dim=1).T,
        f"{target}.attn.qkv.bias": torch.cat([params[f"{attention}/{name}/bias"].flatten() for name in ("query", "key", "value")]),
        f"{target}.attn.proj.weight": out.reshape(-1, out.shape[-1]).T,
        f"{target}.attn.proj.bias": params[f"{attention}/out/bias"],
        **_linear(params, f"{source}/MlpBlock_0/Dense_0", f"{target}.mlp.fc1"),
        **_linear(params, f"{source}/MlpBlock_0/Dense_1", f"{target}.mlp.fc2"),
        **_linear(params, f"{source}/Dense_0", f"{target}.adaLN_modulation.1"),
    }


def _output_layer(kernel: torch.Tensor, bias: torch.Tensor, channels: int) -> dict[str, torch.Tensor]:
    """ConvTranspose ``(p, p, D, 2C)`` (applied flipped) -> Linear rows (part, p_row, p_col, c): ``(2·p·p·C, D)``."""
    patch, _, width, _ = kernel.shape
    flipped = kernel.flip(0, 1).reshape(patch, patch, width, 2, channels)
    weight = flipped.permute(3, 0, 1, 4, 2).reshape(-1, width)
    rows = bias.reshape(2, 1, channels).expand(2, patch * patch, channels).reshape(-1)
    return {"head.linear.weight": weight, "head.linear.bias": rows}


def convert_umd_params(params: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flat official params (``/``-joined keys, with or without ``params/``, stacked or not) -> ``(maskdiff UMD state
    dict, UMD init args)``."""
    params = unstack_scanned(strip_params_prefix(params))
    config = infer_umd_config(params)
    source = {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in params.items()}
    kernel = source["embedding/kernel"]
    converted = {
        "x_embedder.weight": kernel.reshape(-1, kernel.shape[-1]).T, "x_embedder.bias": source["embedding/bias"],
        "pos_embed": source["pos_embedding"], "decoder_pos_embed": source["dec_pos_embedding"],
        "registers": source["cls"], "mask_token": source["image_mask_embedding"],
        **_linear(source, "time_trunk/Dense_0", "t_embedder.trunk.0"),
        **_linear(source, "time_trunk/Dense_1", "t_embedder.trunk.2"),
        **_norm(source, "Encoder/encoder_norm", "norm"),
        **_norm(source, "Decoder/encoder_norm", "head.norm"),
        **_linear(source, "final_modulation", "head.adaLN_modulation.1"),
        **_output_layer(source["final_conv/kernel"], source["final_conv/bias"], config["in_channels"]),
    }
    if config["num_classes"]:
        converted["y_embedder.embedding_table.weight"] = source["label_emb/embedding/embedding"]
        converted |= _linear(source, "label_trunk/Dense_0", "y_trunk.0") | _linear(source, "label_trunk/Dense_1", "y_trunk.2")
    for part, target, depth in (("Encoder", "blocks", config["depth"]), ("Decoder", "decoder_blocks", config["decoder_depth"])):
        for index in range(depth):
            converted |= _block(source, f"{part}/Encoder1DBlock_{index}", f"{target}.{index}")
    converted = {key: value.contiguous() for key, value in converted.items()}
    check_keys_and_shapes(converted, meta_shapes(lambda: UMD(**config)), _not_a_umd)
    return converted, config


def load_official_umd(path: str | os.PathLike) -> UMD:
    """Build a maskdiff :class:`UMD` from a big_vision ``.npz`` params checkpoint (eval mode, on the CPU)."""
    state_dict, config = convert_umd_params(load_big_vision_params(path))
    model = UMD(**config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
