"""Classification fine-tuning of any maskdiff encoder (MAE's ``main_finetune.py`` recipe).

    maskdiff fit --config configs/finetune_digits.yaml --model.init_args.ckpt runs/mae_digits/checkpoints/last.ckpt

The backbone comes from a maskdiff checkpoint (:func:`~maskdiff.methods.checkpoints.load_method`), loaded in
:meth:`FineTune.configure_model`, so parsing a config never reads the file. Parts of the backbone that
``forward_features`` does not use (MAE's decoder, DiT's final layer, MDT's decoder blocks) are frozen and left out of
the optimizer. A time-conditioned backbone (DiT, MDT) runs at one fixed ``timestep`` on clean images and with the
null class (labels never enter the backbone).

Layer-wise lr decay uses :func:`timm.optim.param_groups_layer_decay` with :meth:`FineTune.group_matcher`, which
numbers parameters as MAE does (:mod:`maskdiff.methods.layer_decay`). A group's lr is the optimizer's
lr × ``layer_decay ** (last - layer)``; its ``lr_scale`` is kept in the group.

Video: when the backbone's patchifier has ``frames`` (a DiffMAE or MAE video backbone), batches are clips
``(B, C, T, H, W)``, and the head reads the encoder's space-time tubelet tokens averaged over space and time (``mean``,
the MAE-ST / VideoMAE fine-tuning head) or its cls token (``cls``). Mixup and CutMix work per clip: frames are folded
into channels so every frame of a clip gets the same mixing weight and the same CutMix box (as MAE-ST's video mixup).
Evaluation sees one clip per sample (single view); a data module that yields several views per video,
``(B, V, C, T, H, W)``, is scored by the mean of the views' softmax (MAE-ST's multi-view testing).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from maskdiff.backbones.base import Backbone
from maskdiff.backbones.features import FeatureSpec, backbone_features, resolve_spec
from maskdiff.methods.checkpoints import load_method
from maskdiff.methods.layer_decay import FINETUNE_NO_DECAY, LAST_LAYER, encoder_layer, set_drop_path
from maskdiff.methods.training import TrainingOptions, built_by_cli
from maskdiff.scale.compile import compile_in_place

def default_finetune_optimizer(params) -> torch.optim.Optimizer:
    """MAE fine-tuning's AdamW: betas (0.9, 0.999), weight decay 0.05, lr 1e-3 (MAE: blr 5e-4..1e-3 × batch / 256)."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05)


class FineTune(TrainingOptions):
    """Fine-tune a pre-trained maskdiff backbone for classification: features -> pooling -> linear head.

    Args:
        ckpt: maskdiff checkpoint to take the backbone (and its autoencoder) from; read in ``configure_model``.
        num_classes: classes of the head; default the data module's ``num_classes`` (saved with the run).
        pooling: ``mean``: all blocks without the final norm, mean of the patch tokens (video: of all space-time
            tokens), then a new ``fc_norm`` LayerNorm (MAE's ``--global_pool``, MAE-ST's video head; it starts from
            the backbone's own ``fc_norm`` weights when a converted fine-tuned MAE carries them); ``cls``: all
            blocks + final norm, first token (needs a cls token).
        timestep: timestep of a time-conditioned backbone (default 0); must be unset for MAE.
        weights: ``ema`` or ``raw`` weights of the checkpoint (``ema`` falls back to raw when there is none).
        drop_path_rate: stochastic depth of the last encoder block (linear from 0); backbones whose blocks have no
            drop path (DiT, MDT) need 0.
        layer_decay: layer-wise lr decay (1 = off; MAE ViT-B 0.65, ViT-L 0.75).
        mixup, cutmix: timm ``Mixup`` alphas (0 = off); with either on, the loss is soft-target cross-entropy.
        label_smoothing: label smoothing (inside Mixup's soft targets when mixing, else ``LabelSmoothingCrossEntropy``).
        head_dropout: dropout on the pooled features before the head (MAE-ST's Kinetics fine-tune: 0.3; 0 = off).
        optimizer: called with the parameter groups (default AdamW lr 1e-3, wd 0.05); 1-D parameters and the
            backbone's ``no_weight_decay``, cls and position tokens get no weight decay.
        kwargs: the training options every module shares (lr_scheduler, on_nonfinite, max_skipped_steps,
            compile_backbone: here the backbone's ``forward_features``, compile_kwargs:
            :class:`~maskdiff.methods.training.TrainingOptions`).
    """

    def __init__(
        self,
        ckpt: str,
        num_classes: int | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        timestep: int | None = None,
        weights: Literal["ema", "raw"] = "ema",
        drop_path_rate: float = 0.0,
        layer_decay: float = 1.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        label_smoothing: float = 0.0,
        head_dropout: float = 0.0,
        optimizer: OptimizerCallable = default_finetune_optimizer,
        **kwargs,
    ) -> None:
        super().__init__(optimizer=optimizer, **kwargs)
        self.save_hyperparameters(ignore=None if built_by_cli() else ["optimizer", "lr_scheduler"])
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unknown pooling {pooling!r}; expected one of mean, cls")
        if weights not in ("ema", "raw"):
            raise ValueError(f"unknown weights {weights!r}; expected one of ema, raw")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate {drop_path_rate} is outside [0, 1)")
        if not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"layer_decay {layer_decay} is outside (0, 1]; 1 disables layer-wise decay")
        if mixup < 0 or cutmix < 0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"need mixup >= 0, cutmix >= 0 and label_smoothing in [0, 1), got {mixup}, {cutmix}, {label_smoothing}")
        if not 0.0 <= head_dropout < 1.0:
            raise ValueError(f"head_dropout {head_dropout} is outside [0, 1)")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.ckpt = ckpt
        self.num_classes = num_classes
        self.pooling = pooling
        self.timestep = timestep
        self.weights = weights
        self.drop_path_rate = drop_path_rate
        self.layer_decay = layer_decay
        self.mixup_alpha = mixup
        self.cutmix_alpha = cutmix
        self.label_smoothing = label_smoothing
        self.head_dropout = head_dropout
        self.backbone: Backbone | None = None
        self.spec: FeatureSpec | None = None

    # ------------------------------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if self.num_classes is None:
            if data_classes is None:
                raise ValueError("FineTune: set model.init_args.num_classes (the data module does not say)")
            self.num_classes = data_classes
            self.hparams["num_classes"] = data_classes
        elif data_classes is not None and data_classes > self.num_classes:
            raise ValueError(f"the data has {data_classes} classes but FineTune was set to num_classes {self.num_classes}")

    def configure_model(self) -> None:
        """Load the backbone from ``ckpt``, set drop path, freeze what the features do not use, add norm and head."""
        if self.backbone is not None:
            return
        if self.num_classes is None:
            raise ValueError("FineTune: num_classes is unknown; set model.init_args.num_classes")
        method = load_method(self.ckpt, map_location="cpu")
        use_ema = self.weights == "ema" and method.ema_backbone is not None
        if self.weights == "ema" and not use_ema:
            rank_zero_warn(f"{self.ckpt} has no EMA weights; fine-tuning the raw weights")
        backbone = method.inference_backbone(use_ema)
        self.autoencoder = method.autoencoder
        self.patchifier = backbone.patchifier
        self._check_data()
        depth = backbone.num_blocks if self.pooling == "mean" else None
        self.spec = resolve_spec(backbone, FeatureSpec(self.pooling, depth=depth, timestep=self.timestep, use_ema=use_ema))
        set_drop_path(backbone, self.drop_path_rate)
        feature_dim = self._freeze_unused(backbone)
        self.backbone = backbone.train()
        if self.compile_backbone and self._trainer is not None:
            compile_in_place(self.backbone, features=True, **self.compile_kwargs)
        self.fc_norm = nn.LayerNorm(feature_dim, eps=1e-6) if self.pooling == "mean" else nn.Identity()
        pool_norm = backbone.global_pool_norm
        if self.pooling == "mean" and pool_norm is not None and pool_norm.elementwise_affine:
            self.fc_norm.load_state_dict(pool_norm.state_dict())
        self.head_drop = nn.Dropout(self.head_dropout)
        self.head = nn.Linear(feature_dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        top5 = min(5, self.num_classes)
        self.val_top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(self.num_classes, top_k=top5, average="micro")
        mixing = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        self.mixup_fn = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                              label_smoothing=self.label_smoothing, num_classes=self.num_classes) if mixing else None
        if mixing:
            self.criterion = SoftTargetCrossEntropy()
        elif self.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(self.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    @property
    def is_video(self) -> bool:
        """Whether the backbone takes clips ``(B, C, T, H, W)`` (its patchifier has ``frames``)."""
        return self.patchifier.frames is not None

    def _check_data(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        if datamodule is not None:
            data_frames, model_frames = getattr(datamodule, "num_frames", None), self.patchifier.frames
            data_kind = f"clips of {data_frames} frames" if data_frames is not None else "images"
            if model_frames is None and data_frames is not None:
                raise ValueError(f"{type(datamodule).__name__} gives {data_kind}, but the backbone of {self.ckpt} "
                                 "takes images (B, C, H, W); fine-tune a video checkpoint (a backbone with num_frames)")
            if model_frames is not None and data_frames != model_frames:
                raise ValueError(f"{type(datamodule).__name__} gives {data_kind}, but the backbone of {self.ckpt} "
                                 f"takes clips (B, C, T, H, W) of T = {model_frames} frames; set data num_frames {model_frames}")
        down = self.autoencoder.downsample
        if size is not None and size // down != self.patchifier.input_size:
            raise ValueError(f"data image_size {size} gives inputs of side {size // down} (autoencoder downsample {down}), "
                             f"but the backbone of {self.ckpt} expects input_size {self.patchifier.input_size}")
        expected = self.autoencoder.latent_channels or channels
        if expected is not None and expected != self.patchifier.channels:
            raise ValueError(f"the data gives {expected} channels to the backbone, which expects in_channels {self.patchifier.channels}")

    def _freeze_unused(self, backbone: Backbone) -> int:
        """Trace one dummy input through ``forward_features``: parameters it does not reach are frozen. Returns D."""
        backbone.requires_grad_(True).eval()
        params = dict(backbone.named_parameters())
        reference = next(iter(params.values()))
        tokens = torch.zeros(1, self.patchifier.num_tokens, self.patchifier.values_per_patch,
                             dtype=reference.dtype, device=reference.device)
        with torch.enable_grad():
            features = backbone_features(backbone, tokens, self.spec)
            grads = torch.autograd.grad(features.sum(), list(params.values()), allow_unused=True)
        for param, grad in zip(params.values(), grads):
            param.requires_grad_(grad is not None)
        return features.shape[-1]

    # ------------------------------------------------------------------------------------------ steps
    def check_inputs(self, inputs: torch.Tensor) -> None:
        """Refuse clips given to an image backbone and images given to a video backbone, naming both shapes."""
        if self.is_video and inputs.ndim != 5:
            raise ValueError(f"the backbone of {self.ckpt} takes clips (B, C, T, H, W) = (B, "
                             f"{', '.join(map(str, self.patchifier.sample_shape))}), got a batch of shape {tuple(inputs.shape)}")
        if not self.is_video and inputs.ndim != 4:
            raise ValueError(f"the backbone of {self.ckpt} takes images (B, C, H, W), got a batch of shape "
                             f"{tuple(inputs.shape)}; clips (B, C, T, H, W) need a video checkpoint (a backbone with num_frames)")

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)`` -> pooled, normed features ``(B, D)``."""
        self.check_inputs(inputs)
        tokens = self.to_tokens(inputs)
        return self.fc_norm(backbone_features(self.backbone, tokens, self.spec))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` or clips ``(B, C, T, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.head_drop(self.features(inputs)))

    def to_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images or clips -> autoencoder -> patch tokens ``(B, N, P)``."""
        return self.patchifier.patchify(self.autoencoder.encode(inputs))

    def evaluation_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``; views of a clip ``(B, V, C, T, H, W)`` (video backbones) are averaged in
        probability and the log of the mean softmax is returned."""
        if self.is_video and inputs.ndim == 6:
            probabilities = self(inputs.flatten(0, 1)).float().softmax(dim=-1)
            return probabilities.unflatten(0, inputs.shape[:2]).mean(dim=1).log()
        return self(inputs)

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm Mixup/CutMix of a batch -> (mixed inputs, soft targets ``(B, num_classes)``); a clip's frames are
        folded into its channels, so all of them share one mixing weight and one CutMix box."""
        if inputs.shape[0] % 2:
            raise ValueError(f"mixup/cutmix pair each sample with another and need an even batch size, got {inputs.shape[0]}")
        if inputs.ndim != 5:
            return self.mixup_fn(inputs, labels)
        b, c, t, h, w = inputs.shape
        mixed, targets = self.mixup_fn(inputs.reshape(b, c * t, h, w), labels)
        return mixed.reshape(b, c, t, h, w), targets

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch[0], batch[1].long()
        targets = labels
        if self.mixup_fn is not None:
            inputs, targets = self.mix(inputs, labels)
        loss = self.criterion(self(inputs), targets)
        self.note_loss(loss)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=inputs.shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs, labels = batch[0], batch[1].long()
        if inputs.shape[0] == 0:
            return
        logits = self.evaluation_logits(inputs)
        self.val_top1.update(logits, labels)
        self.val_top5.update(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits.float(), labels), sync_dist=True, batch_size=inputs.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.log("val/top1", self.val_top1.compute(), prog_bar=True, sync_dist=True)
        self.log("val/top5", self.val_top5.compute(), sync_dist=True)
        self.val_top1.reset()
        self.val_top5.reset()

    # ------------------------------------------------------------------------------------------ optim
    def group_matcher(self, coarse: bool = False):
        """timm's layer grouping hook: parameter name -> layer ordinal (see :func:`encoder_layer`)."""
        prefix = "backbone."

        def layer(name: str) -> float:
            return encoder_layer(self.backbone, name[len(prefix):]) if name.startswith(prefix) else LAST_LAYER

        return layer

    def param_groups(self) -> list[dict[str, Any]]:
        """timm layer-decay groups; decayed groups drop their ``weight_decay`` so the optimizer's own applies. No decay
        for 1-D parameters, the backbone's ``no_weight_decay`` and the cls/position tokens (as MAE's fine-tune)."""
        names = self.backbone.no_weight_decay() | FINETUNE_NO_DECAY
        no_decay = [f"backbone.{name}" for name in names]
        groups = param_groups_layer_decay(self, weight_decay=1.0, no_weight_decay_list=no_decay, layer_decay=self.layer_decay)
        for group in groups:
            if group["weight_decay"] != 0.0:
                del group["weight_decay"]
        return groups

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.param_groups())
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        return self.with_scheduler(optimizer)
