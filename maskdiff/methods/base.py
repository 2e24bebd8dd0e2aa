"""The LightningModule every method is: autoencoder -> patchify -> corruption -> backbone -> objective.

A method is this module plus defaults for its parts: it is assembled from small parts, each in its own file — the
training step and data checks (here), the EMA (:mod:`~maskdiff.methods.ema`), generation
(:mod:`~maskdiff.methods.generation`), inpainting (:mod:`~maskdiff.methods.inpainting`), the training guards
(:mod:`~maskdiff.methods.guards`) — and the parts are checked against each other when it is built
(:mod:`~maskdiff.methods.contracts`). To try a new objective, plug an :class:`Objective` by ``class_path`` in YAML or
override :meth:`MaskDiffModule.view_loss`; the training loop stays as it is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from maskdiff.autoencoders.base import Autoencoder, PixelSpace
from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corrupted, Corruption
from maskdiff.methods.contracts import InpaintingMode, check_composition, generation_gap
from maskdiff.methods.ema import BackboneEMA
from maskdiff.methods.generation import Generation
from maskdiff.methods.inpainting import Inpainting
from maskdiff.methods.training import TrainingOptions, built_by_cli
from maskdiff.objectives.base import Objective, ObjectiveOutput
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance
from maskdiff.scale.compile import compile_in_place


class MaskDiffModule(TrainingOptions, BackboneEMA, Generation, Inpainting):
    """A masked-autoencoding / diffusion method as a composition of shared parts.

    Subclasses (the methods) state only their defaults: the parts they default, and the options whose default
    differs, passing everything else on with ``**kwargs`` (which LightningCLI resolves to these arguments).

    Args:
        backbone: token-to-token network (:class:`maskdiff.backbones.Backbone`).
        corruption: clean tokens -> corrupted views (masks and/or noise).
        objective: prediction + view -> loss.
        sampler: reverse process used by :meth:`generate` (generative methods).
        guidance: classifier-free guidance used by :meth:`generate`.
        autoencoder: maps images to the modelled space (``None`` = pixels).
        ema_decay: decay of the exponential moving average of the backbone (``None`` disables EMA).
        ema_warmup_power: ``None``: ``ema_decay`` from the first update; a power (e.g. 0.75): timm's warm-up
            ``min(ema_decay, 1 - (1 + (n - 1) / ema_warmup_gamma) ** -power)`` at update ``n``
            (:mod:`~maskdiff.methods.ema`).
        ema_warmup_gamma: the warm-up's step scale (timm's ``warmup_gamma``).
        clip_x0: clamp x̂0 while sampling (1.0 for pixels in [-1, 1]; ``None`` for latents).
        inpainting: ``repaint``, ``hidden_chain`` or ``reconstruct`` (:mod:`maskdiff.methods.inpainting`); ``None``:
            the method's own (``default_inpainting``), or none for a method that cannot generate.
        kwargs: the training options every module shares (optimizer, lr_scheduler, on_nonfinite, max_skipped_steps,
            compile_backbone, compile_kwargs: :class:`~maskdiff.methods.training.TrainingOptions`).
    """

    default_inpainting: ClassVar[InpaintingMode] = "repaint"

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption,
        objective: Objective,
        sampler: Sampler | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        autoencoder: Autoencoder | None = None,
        ema_decay: float | None = 0.9999,
        ema_warmup_power: float | None = None,
        ema_warmup_gamma: float = 1.0,
        clip_x0: float | None = None,
        inpainting: InpaintingMode | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        components = ["backbone", "corruption", "objective", "sampler", "guidance", "autoencoder", "optimizer", "lr_scheduler"]
        self.save_hyperparameters(ignore=None if built_by_cli() else components)
        if inpainting is None:
            inpainting = self.default_inpainting
            if inpainting != "reconstruct" and generation_gap(corruption, objective) is not None:
                inpainting = None
        check_composition(type(self).__name__, backbone, corruption, objective, sampler, inpainting)
        self.backbone = backbone
        self.corruption = corruption
        self.objective = objective
        self.sampler = sampler
        self.guidance = guidance
        self.autoencoder = autoencoder or PixelSpace()
        self.clip_x0 = clip_x0
        self.inpainting = inpainting
        # id(parameter) -> decayed, fixed in configure_model before FSDP flattens the parameters.
        self._weight_decayed: dict[int, bool] | None = None
        # Set by setup() from the datamodule's ``pre_encoded``: batches are latents, not images.
        self.inputs_pre_encoded = False
        self.init_ema(backbone, ema_decay, ema_warmup_power, ema_warmup_gamma)

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

    def _evaluation_step(self, stage: str, batch, batch_idx: int) -> torch.Tensor | None:
        images, labels = self.unpack(batch)
        if images.shape[0] == 0:  # every sample of the batch was skipped: nothing to average (not a NaN loss)
            return None
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
        """``id(parameter) -> decayed`` for the trainable parameters: the backbone's by its ``decays`` (by default no
        decay for 1-D ones and ``no_weight_decay``), the others' unless 1-D."""
        backbone = {id(param): self.backbone.decays(name, param) for name, param in self.backbone.named_parameters()}
        return {id(param): backbone.get(id(param), param.ndim > 1) for param in self.parameters() if param.requires_grad}

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
        data_scale, model_scale = getattr(datamodule, "scale_factor", None), self.autoencoder.scale_factor
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
        return self.with_scheduler(self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]))

    # ------------------------------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture with one message naming the first mismatch. FSDP
        checkpoints carry no ``state_dict`` here (the strategy loads the weights itself, strictly)."""
        super().on_load_checkpoint(checkpoint)
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
