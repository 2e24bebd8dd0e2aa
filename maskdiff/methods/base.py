"""The LightningModule every method is: autoencoder -> patchify -> corruption -> backbone -> objective.

A method is this module plus defaults for its parts. To try a new objective, plug an :class:`Objective` by
``class_path`` in YAML or override :meth:`MaskDiffModule.view_loss`; the training loop stays as it is.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from maskdiff.autoencoders.base import Autoencoder, PixelSpace
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.corruption.pixel_masks import as_pixel_mask, token_mask
from maskdiff.methods.guards import NonFiniteAction, TrainingGuards
from maskdiff.objectives.base import Objective, ObjectiveOutput
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.denoiser import Denoiser
from maskdiff.samplers.guidance import ClassifierFreeGuidance
from maskdiff.scale.compile import check_compile_kwargs, compile_in_place


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def _built_by_cli() -> bool:
    """True while LightningCLI (or ``load_from_checkpoint``) instantiates us with a config to save as hparams."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - older/newer Lightning without the context variable
        return False
    return _given_hyperparameters.get() is not None


class MaskDiffModule(TrainingGuards, L.LightningModule):
    """A masked-autoencoding / diffusion method as a composition of shared parts.

    Args:
        backbone: token-to-token network (:class:`maskdiff.backbones.Backbone`).
        corruption: clean tokens -> corrupted views (masks and/or noise).
        objective: prediction + view -> loss.
        sampler: reverse process used by :meth:`generate` (generative methods).
        guidance: classifier-free guidance used by :meth:`generate`.
        autoencoder: maps images to the modelled space (``None`` = pixels).
        optimizer: called with parameter groups (weight decay off for 1-D params and ``no_weight_decay``).
        lr_scheduler: called with the optimizer; stepped every optimizer step.
        ema_decay: decay of the exponential moving average of the backbone (``None`` disables EMA).
        clip_x0: clamp x̂0 while sampling (1.0 for pixels in [-1, 1]; ``None`` for latents).
        on_nonfinite: a non-finite loss or gradient ``stop``s the run before the optimizer step (the last
            checkpoint stays good) or ``skip``s that step (:mod:`maskdiff.methods.guards`).
        max_skipped_steps: with ``skip``, stop after this many skipped steps in a row.
        compile_backbone: ``torch.compile`` the backbone (only it: not the EMA copy, the autoencoder or this
            module) in :meth:`configure_model`, when a trainer runs the model; state-dict keys stay the same.
        compile_kwargs: :func:`torch.compile` options, e.g. ``{mode: max-autotune}`` or ``{backend: aot_eager}``.
    """

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption,
        objective: Objective,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        autoencoder: Autoencoder | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = 0.9999,
        clip_x0: float | None = None,
        on_nonfinite: NonFiniteAction = "stop",
        max_skipped_steps: int = 20,
        compile_backbone: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        components = ["backbone", "corruption", "objective", "sampler", "guidance", "autoencoder", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if _built_by_cli() else components)
        if objective.output_parts != backbone.output_parts:
            raise ValueError(
                f"{type(objective).__name__} expects the backbone to output {objective.output_parts} part(s) per token, "
                f"but {type(backbone).__name__} outputs {backbone.output_parts} (check learn_sigma on both)"
            )
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay {ema_decay} is outside [0, 1); expected e.g. 0.9999 or null to disable EMA")
        self.backbone = backbone
        self.corruption = corruption
        self.objective = objective
        self.sampler = sampler
        self.guidance = guidance
        self.autoencoder = autoencoder or PixelSpace()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ema_decay = ema_decay
        self.clip_x0 = clip_x0
        self.init_guards(on_nonfinite, max_skipped_steps)
        self.compile_backbone = compile_backbone
        self.compile_kwargs = check_compile_kwargs(compile_kwargs)
        # id(parameter) -> decayed, fixed in configure_model before FSDP flattens the parameters.
        self._weight_decayed: dict[int, bool] | None = None
        # Set by setup() from the datamodule's ``pre_encoded``: batches are latents, not images.
        self.inputs_pre_encoded = False
        # The EMA copy is only ever run under an explicit eval() in generate(); it keeps train mode otherwise.
        self.ema_backbone = copy.deepcopy(backbone).requires_grad_(False) if ema_decay is not None else None

    # ------------------------------------------------------------------------------------------ data flow
    @property
    def patchifier(self):
        return self.backbone.patchifier

    @property
    def conditional(self) -> bool:
        return self.backbone.num_classes > 0

    def unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(images, labels)`` or ``images`` -> images ``(B, C, H, W)``, labels ``(B,)`` or ``None``."""
        if isinstance(batch, (tuple, list)):
            images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            images, labels = batch, None
        return images, (labels.long() if labels is not None and self.conditional else None)

    def to_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> modelled space -> clean tokens ``(B, N, P)``."""
        return self.patchifier.patchify(self.autoencoder.encode(images))

    def batch_tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        """A training/evaluation batch -> clean tokens ``(B, N, P)``: images via :meth:`to_tokens`, pre-encoded
        latents (``inputs_pre_encoded``, e.g. from a ``LatentShardsDataModule``) patchified as they are."""
        return self.patchifier.patchify(inputs) if self.inputs_pre_encoded else self.to_tokens(inputs)

    def view_loss(self, view: Corrupted, labels: torch.Tensor | None) -> ObjectiveOutput:
        """Run the backbone on one corrupted view and score it; override to change how a view is trained."""
        y = None if labels is None or not view.conditional else labels[view.rows]
        prediction = self.backbone(view.tokens, view.model_t, y, view.masking)
        return self.objective(prediction, view)

    def step_loss(self, images: torch.Tensor, labels: torch.Tensor | None) -> ObjectiveOutput:
        """Weighted sum of the objective over every view the corruption makes of the batch."""
        views = self.corruption(self.batch_tokens(images), self.patchifier.grid)
        total = 0.0
        parts: dict[str, torch.Tensor] = {}
        for view in views:
            output = self.view_loss(view, labels)
            total = total + view.weight * output.loss
            prefix = f"{view.name}/" if view.name else ""
            parts.update({prefix + key: value for key, value in output.parts.items()})
            if view.name:
                parts[f"{view.name}/loss"] = output.loss.detach()
        return ObjectiveOutput(loss=total, parts=parts)

    def _log_step(self, stage: str, output: ObjectiveOutput, batch_size: int) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss", output.loss.detach(), prog_bar=True, on_step=on_step, on_epoch=not on_step,
                 batch_size=batch_size, sync_dist=not on_step)
        for key, value in output.parts.items():
            self.log(f"{stage}/{key}", value, on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                     sync_dist=not on_step)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self.unpack(batch)
        output = self.step_loss(images, labels)
        self.note_loss(output.loss)
        self._log_step("train", output, images.shape[0])
        return output.loss

    def _evaluation_step(self, stage: str, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self.unpack(batch)
        # Fixed corruption randomness per batch: the validation loss is comparable across epochs and runs.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(batch_idx + 1000 * self.global_rank)
            output = self.step_loss(images, labels)
        self._log_step(stage, output, images.shape[0])
        return output.loss

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._evaluation_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._evaluation_step("test", batch, batch_idx)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Generate one image per label of the batch (images ``(B, C, H, W)`` in the data's range)."""
        _, labels = self.unpack(batch)
        generator = torch.Generator().manual_seed(batch_idx)
        return self.generate(labels, num=None if labels is not None else len(batch[0]), generator=generator)

    # ------------------------------------------------------------------------------------------ EMA
    @torch.no_grad()
    def update_ema(self) -> None:
        if self.ema_backbone is None:
            return
        ema_params = list(self.ema_backbone.parameters())
        live_params = list(self.backbone.parameters())
        torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(live_params, ema_params)], 1 - self.ema_decay)
        for ema_buffer, buffer in zip(self.ema_backbone.buffers(), self.backbone.buffers()):
            ema_buffer.copy_(buffer)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: both are done before any ``on_train_batch_end`` callback (such
        as a periodic ``ModelCheckpoint``) sees the step, so a checkpoint's EMA matches its weights."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def inference_backbone(self, use_ema: bool = True) -> Backbone:
        return self.ema_backbone if use_ema and self.ema_backbone is not None else self.backbone

    # ------------------------------------------------------------------------------------------ generation
    def denoiser(self, use_ema: bool = True, guidance: ClassifierFreeGuidance | None = None) -> Denoiser:
        schedule = getattr(self.corruption, "schedule", None)
        prediction = getattr(self.objective, "prediction", None)
        if schedule is None or prediction is None:
            raise ValueError(f"{type(self).__name__} is not generative: its corruption has no noise schedule")
        return Denoiser(
            self.inference_backbone(use_ema),
            schedule,
            prediction=prediction,
            learn_sigma=self.objective.output_parts == 2 and getattr(self.objective, "learn_sigma", False),
            guidance=guidance if guidance is not None else self.guidance,
            clip_x0=self.clip_x0,
            prediction_part=getattr(self.objective, "prediction_part", 0),
            time_offset=getattr(self.corruption, "model_time_offset", 0),
        )

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | None = None,
        num: int | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Sample images ``(B, C, H, W)``: one per label, or ``num`` unconditional ones."""
        if labels is None and num is None:
            raise ValueError("pass labels (class-conditional) or num (unconditional)")
        batch = len(labels) if labels is not None else num
        sampler = sampler or self.sampler or DDPMSampler()
        denoiser = self.denoiser(use_ema, guidance)
        was_training = denoiser.backbone.training
        denoiser.backbone.eval()
        shape = (batch, self.patchifier.num_tokens, self.patchifier.values_per_patch)
        labels = labels.to(self.device) if labels is not None and self.conditional else None
        tokens = sampler.sample(denoiser, shape, labels, generator=generator, device=self.device, steps=steps)
        denoiser.backbone.train(was_training)
        return self.autoencoder.decode(self.patchifier.unpatchify(tokens))

    def inpainting_masks(self, images: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_mask`` checked against ``images (B, C, H, W)`` as bool ``(B, 1, H, W)``, and the token mask
        ``(B, N)`` it implies (a token is generated if any of its pixels is); True = generate."""
        pixel_mask = as_pixel_mask(pixel_mask, images)
        return pixel_mask, token_mask(pixel_mask, self.autoencoder.downsample * self.patchifier.patch_size)

    @torch.no_grad()
    def inpaint(
        self,
        images: torch.Tensor,
        pixel_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Fill the masked pixels of ``images (B, C, H, W)`` in [-1, 1]; returns ``(B, C, H, W)``.

        ``pixel_mask (B, 1, H, W)`` or ``(B, H, W)`` bool, True = generate (a batch of 1 is broadcast). A token is
        generated if any of its pixels is masked (the mask is max-pooled over autoencoder downsample × patch
        size); the sampler runs RePaint-style, replacing the known tokens by the encoded image noised to each step,
        which suits models trained on full images. The known pixels are then pasted back, so they come out exactly
        as given even where a latent autoencoder's round trip is lossy. Methods with a native conditional decoder
        (MAE, DiffMAE) override this hook.
        """
        images = images.to(self.device)
        pixel_mask, generate_tokens = self.inpainting_masks(images, pixel_mask)
        known = self.to_tokens(images)
        sampler = sampler or self.sampler or DDPMSampler()
        denoiser = self.denoiser(use_ema, guidance)
        labels = labels.to(self.device) if labels is not None and self.conditional else None
        was_training = denoiser.backbone.training
        denoiser.backbone.eval()
        try:
            tokens = sampler.sample(denoiser, tuple(known.shape), labels, generator=generator, known=known,
                                    mask=generate_tokens, device=self.device, steps=steps)
        finally:
            denoiser.backbone.train(was_training)
        generated = self.autoencoder.decode(self.patchifier.unpatchify(tokens)).to(images.dtype)
        return torch.where(pixel_mask, generated, images)

    # ------------------------------------------------------------------------------------------ setup & optim
    def configure_model(self) -> None:
        """Compile the backbone when ``compile_backbone`` is set and a trainer runs the model (``load_from_checkpoint``
        and the tools have none, so they stay eager), and fix which parameters are weight-decayed while they still
        have their shapes and names (FSDP flattens and renames them before ``configure_optimizers``). Subclasses
        that override this hook call ``super()``."""
        if self._trainer is None:
            return
        if self.compile_backbone:
            compile_in_place(self.backbone, **self.compile_kwargs)
        if self._weight_decayed is None:
            self._weight_decayed = self.weight_decayed()

    def weight_decayed(self) -> dict[int, bool]:
        """``id(parameter) -> decayed`` for the trainable parameters: no decay for 1-D ones and ``no_weight_decay``."""
        no_decay_names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        return {id(param): param.ndim > 1 and name not in no_decay_names
                for name, param in self.named_parameters() if param.requires_grad}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.check_data(datamodule)
            self.inputs_pre_encoded = bool(getattr(datamodule, "pre_encoded", False))

    def check_data(self, datamodule) -> None:
        """Stop before training when the data's size, channels or classes do not fit the backbone.

        Pre-encoded data (``datamodule.pre_encoded``) gives latents: their size and channels are compared with
        the backbone directly, and their ``scale_factor`` (when known) with the autoencoder's.
        """
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        classes = getattr(datamodule, "num_classes", None)
        patchifier = self.patchifier
        pre_encoded = bool(getattr(datamodule, "pre_encoded", False))
        down = 1 if pre_encoded else self.autoencoder.downsample
        if size is not None and size // down != patchifier.input_size:
            raise ValueError(
                f"data image_size {size} gives inputs of side {size // down} (autoencoder downsample {down}), "
                f"but the backbone expects input_size {patchifier.input_size}"
            )
        expected_channels = channels if pre_encoded else self.autoencoder.latent_channels or channels
        data_scale, model_scale = getattr(datamodule, "scale_factor", None), getattr(self.autoencoder, "scale_factor", None)
        if pre_encoded and data_scale is not None and model_scale is not None and abs(data_scale - model_scale) > 1e-6:
            raise ValueError(f"the latents were scaled by {data_scale} but the autoencoder uses scale_factor {model_scale}")
        if expected_channels is not None and expected_channels != patchifier.channels:
            raise ValueError(
                f"the data gives {expected_channels} channels to the backbone, which expects in_channels {patchifier.channels}"
            )
        if classes is not None and self.conditional and classes > self.backbone.num_classes:
            raise ValueError(f"the data has {classes} classes but the backbone was built for num_classes {self.backbone.num_classes}")

    def configure_optimizers(self):
        decayed = {**self.weight_decayed(), **(self._weight_decayed or {})}
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if decayed[id(param)] else no_decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with one message naming the first mismatch. FSDP
        checkpoints carry no ``state_dict`` here (the strategy loads the weights itself, strictly)."""
        if "state_dict" not in checkpoint:
            return
        expected = self.state_dict()
        saved = checkpoint.get("state_dict", {})
        missing = sorted(set(expected) - set(saved))
        unexpected = sorted(set(saved) - set(expected))
        wrong = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            details = []
            if wrong:
                k = wrong[0]
                details.append(f"{k} has shape {tuple(saved[k].shape)}, this model expects {tuple(expected[k].shape)}")
            if missing:
                details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
            raise ValueError(
                f"checkpoint does not fit {type(self).__name__} with {type(self.backbone).__name__}"
                f"{tuple(self.patchifier.sample_shape)}: " + "; ".join(details)
            )
