"""``maskdiff convert <family> SRC OUT``: official weights (or a sharded FSDP checkpoint) -> a maskdiff checkpoint that
``sample`` can use.

    maskdiff convert dit DiT-XL-2-256x256.pt dit_xl2.ckpt --vae /models/sd-vae-ft-ema
    maskdiff convert mdt mdt_xl2_v2_ckpt.pt mdt_xl2.ckpt
    maskdiff convert mae mae_pretrain_vit_base.pth mae_base.ckpt
    maskdiff convert umd umd_b4_params.npz umd_b4.ckpt
    maskdiff convert fsdp runs/dit_xl2/checkpoints/last.ckpt/ dit_xl2_last.ckpt

The state-dict converters live in :mod:`maskdiff.convert`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from maskdiff.convert.dit import _allow_train_args, convert_dit_state_dict
from maskdiff.convert.fsdp import consolidate_sharded_checkpoint
from maskdiff.convert.mae import fold_pixel_normalization, mae_from_official
from maskdiff.convert.mdt import convert_mdt_state_dict
from maskdiff.convert.umd import convert_umd_params, load_big_vision_params
from maskdiff.files import save_torch
from maskdiff.methods.checkpoints import read_checkpoint, require_file, write_method_checkpoint


def generative_init_args(backbone_class: str, backbone_config: dict, guidance: dict, vae: str | None, vae_scale_factor: float) -> dict:
    """Method config of an imported generative model: the backbone, stored guidance, no separate EMA (the released
    weights are the EMA weights) and, when given, the local SD VAE that decodes its latents."""
    init_args = {
        "backbone": {"class_path": backbone_class, "init_args": backbone_config},
        "guidance": {"class_path": "maskdiff.samplers.ClassifierFreeGuidance", "init_args": guidance},
        "ema_decay": None,
    }
    if vae is not None:
        init_args["autoencoder"] = {
            "class_path": "maskdiff.autoencoders.StableDiffusionVAE",
            "init_args": {"path": vae, "scale_factor": vae_scale_factor},
        }
    return init_args


def dit(
    src: str,
    out: str,
    num_heads: int | None = None,
    vae: str | None = None,
    vae_scale_factor: float = 0.18215,
    cfg_scale: float = 1.5,
    cfg_channels: int | None = 3,
) -> str:
    """Import a facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt) as a maskdiff DiT checkpoint.

        maskdiff convert dit DiT-XL-2-256x256.pt dit_xl2.ckpt --vae /models/sd-vae-ft-ema

    The imported weights become the backbone (no separate EMA: the released files are the EMA weights).

    Args:
        src: official ``.pt`` file (a plain state dict, or a train.py checkpoint: its ``ema`` weights are used).
        out: maskdiff ``.ckpt`` to write.
        num_heads: attention heads, needed only for sizes outside DiT-{S,B,L,XL}.
        vae: local SD-VAE directory (``AutoencoderKL.save_pretrained`` layout) to decode latents when sampling.
        vae_scale_factor: latent scale of the VAE.
        cfg_scale: default guidance scale stored with the model (DiT's FID setting: 1.5).
        cfg_channels: channels guided by default (the official code guides 3 of 4; null for all).
    """
    official = read_checkpoint(require_file(src, "DiT checkpoint"), "expected a facebookresearch/DiT .pt file")
    state_dict, backbone_config = convert_dit_state_dict(official, num_heads=num_heads)
    guidance = {"scale": cfg_scale, "channels": cfg_channels}
    init_args = generative_init_args("maskdiff.backbones.DiT", backbone_config, guidance, vae, vae_scale_factor)
    path = write_method_checkpoint(out, "maskdiff.methods.DiT", init_args, {f"backbone.{k}": v for k, v in state_dict.items()})
    size = f"depth {backbone_config['depth']}, width {backbone_config['hidden_size']}, patch {backbone_config['patch_size']}"
    print(f"wrote {path}: DiT ({size}, input {backbone_config['input_size']}, {backbone_config['num_classes']} classes)")
    return str(path)


def mdt(
    src: str,
    out: str,
    decode_layer: int | None = None,
    vae: str | None = None,
    vae_scale_factor: float = 0.18215,
    cfg_scale: float = 3.8,
    cfg_power: float = 4.0,
    cfg_channels: int | None = 3,
) -> str:
    """Import a sail-sg/MDT checkpoint (MDTv1 or MDTv2, detected from its keys) as a maskdiff MDT checkpoint.

        maskdiff convert mdt mdt_xl2_v2_ckpt.pt mdt_xl2.ckpt --vae /models/sd-vae-ft-ema

    Args:
        src: official ``.pt``/``.pth`` state dict (or a training checkpoint: its ``ema`` weights are used).
        out: maskdiff ``.ckpt`` to write.
        decode_layer: MDTv1 decoder blocks (not visible in the weights; 2 in every release).
        vae: local SD-VAE directory (``AutoencoderKL.save_pretrained`` layout) to decode latents when sampling.
        vae_scale_factor: latent scale of the VAE.
        cfg_scale: default guidance scale stored with the model (MDT's: 3.8, power-cosine schedule).
        cfg_power: power of the power-cosine guidance schedule (MDT's: 4).
        cfg_channels: channels guided by default (the official code guides 3 of 4; null for all).
    """
    official = read_checkpoint(require_file(src, "MDT checkpoint"), "expected a sail-sg/MDT .pt file")
    state_dict, cls, backbone_config = convert_mdt_state_dict(official, decode_layer)
    guidance = {"scale": cfg_scale, "channels": cfg_channels, "schedule": "power_cosine", "power": cfg_power}
    init_args = generative_init_args(f"maskdiff.backbones.{cls.__name__}", backbone_config, guidance, vae, vae_scale_factor)
    path = write_method_checkpoint(out, "maskdiff.methods.MDT", init_args, {f"backbone.{k}": v for k, v in state_dict.items()})
    print(f"wrote {path}: {cls.__name__} (depth {backbone_config['depth']}, width {backbone_config['hidden_size']}, "
          f"decode_layer {backbone_config['decode_layer']}, {backbone_config['num_classes']} classes)")
    return str(path)


def mae(
    src: str,
    out: str,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    norm_pix: bool | None = None,
    mask_ratio: float = 0.75,
    fold_imagenet_normalization: bool = True,
) -> str:
    """Import a facebookresearch/mae checkpoint (mae_pretrain_vit_*.pth or mae_visualize_vit_*.pth) as a maskdiff MAE.

        maskdiff convert mae mae_pretrain_vit_base.pth mae_base.ckpt

    The released mae_pretrain_vit_*.pth files hold the encoder only: the decoder of the written checkpoint is then
    freshly initialised (fine for features, probes and fine-tuning; reconstructions need a full checkpoint).

    Args:
        src: official ``.pth`` file (``{"model": state_dict}`` or a bare state dict).
        out: maskdiff ``.ckpt`` to write.
        num_heads: encoder heads, needed only for sizes outside MAE_SIZES.
        decoder_num_heads: decoder heads, likewise.
        norm_pix: loss target of the written method; default: true for encoder-only files (the released pre-training
            runs used --norm_pix_loss), false for full ones (the visualisation models predict pixels).
        mask_ratio: hidden share of the written method's TokenMasking.
        fold_imagenet_normalization: rewrite the patch embedding (and a pixel-loss decoder's output layer) so the model
            reads and predicts maskdiff's [-1, 1] pixels instead of ImageNet-normalised ones; false keeps the official
            function exactly.
    """
    with _allow_train_args():
        official = read_checkpoint(require_file(src, "MAE checkpoint"), "expected a facebookresearch/mae .pth file")
    model, backbone_config, decoder_loaded = mae_from_official(official, num_heads, decoder_num_heads)
    norm_pix = (not decoder_loaded) if norm_pix is None else norm_pix
    state_dict = model.state_dict()
    if fold_imagenet_normalization:
        state_dict = fold_pixel_normalization(state_dict, outputs=decoder_loaded and not norm_pix)
    init_args = {
        "backbone": {"class_path": "maskdiff.backbones.MAE", "init_args": backbone_config},
        "corruption": {"class_path": "maskdiff.corruption.TokenMasking", "init_args": {"mask_ratio": mask_ratio}},
        "objective": {
            "class_path": "maskdiff.objectives.MaskedReconstruction",
            "init_args": {"norm_pix": norm_pix, "region": "masked"},
        },
        "ema_decay": None,
    }
    path = write_method_checkpoint(out, "maskdiff.methods.MAE", init_args, {f"backbone.{k}": v for k, v in state_dict.items()})
    size = f"depth {backbone_config['depth']}, width {backbone_config['hidden_size']}, patch {backbone_config['patch_size']}"
    decoder = "decoder loaded" if decoder_loaded else "encoder only: decoder freshly initialised"
    print(f"wrote {path}: MAE ({size}, input {backbone_config['input_size']}; {decoder}; norm_pix {norm_pix})")
    return str(path)


def umd(
    src: str,
    out: str,
    vae: str | None = None,
    vae_scale_factor: float = 0.18215,
    cfg_scale: float | None = None,
) -> str:
    """Import a big_vision UMD params checkpoint (philippe-eecs/small-vision, ``adaln=True``) as a maskdiff UMD.

        maskdiff convert umd umd_b4_params.npz umd_b4.ckpt

    The sizes are read from the weights; blocks stacked by ``scan=True`` or unstacked both load. The written method
    has UMD's defaults (DDIM-125, η = 1) and the official diffusion setting of its space: cosine β and x̂0 clipped to
    [-1, 1] for pixels, linear β and no clipping for latents (``--vae``).

    Args:
        src: ``.npz`` whose keys are the flax param paths joined by ``/`` (with or without a leading ``params/``).
        out: maskdiff ``.ckpt`` to write.
        vae: local SD-VAE directory (``AutoencoderKL.save_pretrained`` layout) of a latent model.
        vae_scale_factor: latent scale of the VAE.
        cfg_scale: default guidance scale of a class-conditional model, on all output channels (the official CFG);
            none: no stored guidance.
    """
    state_dict, backbone_config = convert_umd_params(load_big_vision_params(require_file(src, "UMD checkpoint")))
    init_args = {
        "backbone": {"class_path": "maskdiff.backbones.UMD", "init_args": backbone_config},
        "corruption": {
            "class_path": "maskdiff.corruption.UnifiedMaskedNoise",
            "init_args": {"schedule": "linear" if vae is not None else "cosine"},
        },
        "clip_x0": None if vae is not None else 1.0,
        "ema_decay": None,
    }
    if cfg_scale is not None:
        init_args["guidance"] = {"class_path": "maskdiff.samplers.ClassifierFreeGuidance", "init_args": {"scale": cfg_scale}}
    if vae is not None:
        init_args["autoencoder"] = {
            "class_path": "maskdiff.autoencoders.StableDiffusionVAE",
            "init_args": {"path": vae, "scale_factor": vae_scale_factor},
        }
    path = write_method_checkpoint(out, "maskdiff.methods.UMD", init_args, {f"backbone.{k}": v for k, v in state_dict.items()})
    size = (f"depth {backbone_config['depth']}+{backbone_config['decoder_depth']}, width {backbone_config['hidden_size']}, "
            f"patch {backbone_config['patch_size']}")
    print(f"wrote {path}: UMD ({size}, input {backbone_config['input_size']}, {backbone_config['num_classes']} classes)")
    return str(path)


def fsdp(src: str, out: str, keep_optimizer_states: bool = False) -> str:
    """Consolidate a sharded FSDP checkpoint directory into one ``.ckpt`` file (runs on the CPU, one process).

        maskdiff convert fsdp runs/dit_xl2/checkpoints/last.ckpt/ dit_xl2_last.ckpt

    Args:
        src: the checkpoint directory (e.g. ``runs/dit_xl2/checkpoints/last.ckpt/``).
        out: ``.ckpt`` file to write.
        keep_optimizer_states: keep the optimizer states (to resume under DDP or one device); off: weights only,
            enough to sample, evaluate, probe or fine-tune.
    """
    checkpoint = consolidate_sharded_checkpoint(src, keep_optimizer_states)
    path = save_torch(checkpoint, Path(out))
    tensors = sum(1 for value in checkpoint["state_dict"].values() if isinstance(value, torch.Tensor))
    optimizer = "with optimizer states" if "optimizer_states" in checkpoint else "weights only"
    print(f"wrote {path}: {tensors} tensors from {src}, step {checkpoint.get('global_step', '?')} ({optimizer})")
    return str(path)


CONVERTERS = {"dit": dit, "mdt": mdt, "mae": mae, "umd": umd, "fsdp": fsdp}
