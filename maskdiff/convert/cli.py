"""``maskdiff convert <family> SRC OUT``: official weights -> a maskdiff checkpoint that ``sample`` can use."""

from __future__ import annotations

import torch

from maskdiff.checkpoints import require_file, write_method_checkpoint
from maskdiff.convert.dit import convert_dit_state_dict


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
    official = torch.load(require_file(src, "DiT checkpoint"), map_location="cpu", weights_only=True)
    state_dict, backbone_config = convert_dit_state_dict(official, num_heads=num_heads)
    init_args = {
        "backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": backbone_config},
        "guidance": {
            "class_path": "maskdiff.samplers.ClassifierFreeGuidance",
            "init_args": {"scale": cfg_scale, "channels": cfg_channels},
        },
        "ema_decay": None,
    }
    if vae is not None:
        init_args["autoencoder"] = {
            "class_path": "maskdiff.autoencoders.StableDiffusionVAE",
            "init_args": {"path": vae, "scale_factor": vae_scale_factor},
        }
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
    from maskdiff.convert.mdt import convert_mdt_state_dict

    official = torch.load(require_file(src, "MDT checkpoint"), map_location="cpu", weights_only=True)
    state_dict, cls, backbone_config = convert_mdt_state_dict(official, decode_layer)
    init_args = {
        "backbone": {"class_path": f"maskdiff.backbones.{cls.__name__}", "init_args": backbone_config},
        "guidance": {
            "class_path": "maskdiff.samplers.ClassifierFreeGuidance",
            "init_args": {"scale": cfg_scale, "channels": cfg_channels, "schedule": "power_cosine", "power": cfg_power},
        },
        "ema_decay": None,
    }
    if vae is not None:
        init_args["autoencoder"] = {
            "class_path": "maskdiff.autoencoders.StableDiffusionVAE",
            "init_args": {"path": vae, "scale_factor": vae_scale_factor},
        }
    path = write_method_checkpoint(out, "maskdiff.methods.MDT", init_args, {f"backbone.{k}": v for k, v in state_dict.items()})
    print(f"wrote {path}: {cls.__name__} (depth {backbone_config['depth']}, width {backbone_config['hidden_size']}, "
          f"decode_layer {backbone_config['decode_layer']}, {backbone_config['num_classes']} classes)")
    return str(path)


CONVERTERS = {"dit": dit, "mdt": mdt}
