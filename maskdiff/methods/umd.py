"""UMD: unified masked diffusion, one model for generation and representation (Hansen-Estruch et al.).

Pre-training mixes a noise-free, high-mask step (t = 0) with masked-and-noised steps and predicts ``[x0 ‖ ε]``;
the DiT-like, MaskDiT-like and MAE-like baselines of the paper are the same method with other corruption settings
(``configs/umd/*_baseline.yaml``). A class-conditional fine-tune starts from a pre-training with ``init_from``.
"""

from __future__ import annotations

from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from maskdiff.backbones.base import Backbone
from maskdiff.corruption.base import Corruption
from maskdiff.corruption.noising import UnifiedMaskedNoise
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.checkpoints import load_backbone_weights
from maskdiff.objectives.base import Objective
from maskdiff.objectives.dual import DualPredictionLoss
from maskdiff.optim import mae_adamw
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddim import DDIMSampler


class UMD(MaskDiffModule):
    """``None`` parts take UMD's defaults: :class:`UnifiedMaskedNoise` (r = 0.5, 75% / 37.5% masks, cosine β),
    :class:`DualPredictionLoss`, DDIM with 125 steps, η = 1 and big_vision's timestep grid (``spacing:
    big_vision``), and guidance on all output channels when a scale is given, AdamW as MAE's (betas 0.9/0.95, weight
    decay 0.05, lr 1.5e-4: scale it by batch / 256) and no EMA. Clip x̂0 to [-1, 1] in pixel space (``clip_x0:
    1.0``), not for latents.

    Args:
        init_from: a maskdiff checkpoint whose backbone weights start this run (the class-conditional fine-tune of a
            pre-training: parameters it lacks, such as a new label embedder, keep their init and are listed).
            Loaded in ``configure_model``, before Lightning restores a resumed run, so ``--ckpt_path`` still wins.
        init_weights: ``ema`` or ``raw`` weights of ``init_from``.
        Other options: :class:`~maskdiff.methods.base.MaskDiffModule`.
    """

    def __init__(
        self,
        backbone: Backbone,
        corruption: Corruption | None = None,
        objective: Objective | None = None,
        sampler: Sampler | None = None,
        optimizer: OptimizerCallable = mae_adamw,
        ema_decay: float | None = None,
        init_from: str | None = None,
        init_weights: str = "ema",
        **kwargs,
    ) -> None:
        if init_weights not in ("ema", "raw"):
            raise ValueError(f"init_weights {init_weights!r} is invalid; expected 'ema' or 'raw'")
        super().__init__(
            backbone=backbone,
            corruption=corruption if corruption is not None else UnifiedMaskedNoise(),
            objective=objective if objective is not None else DualPredictionLoss(),
            sampler=sampler if sampler is not None else DDIMSampler(125, eta=1.0, spacing="big_vision"),
            optimizer=optimizer,
            ema_decay=ema_decay,
            **kwargs,
        )
        self.init_from = init_from
        self.init_weights = init_weights
        self._initialised = False

    def setup(self, stage: str) -> None:
        """Tell a :class:`UnifiedMaskedNoise` this process's rank, so its noise-free share is of the global batch."""
        super().setup(stage)
        if self._trainer is not None and isinstance(self.corruption, UnifiedMaskedNoise):
            self.corruption.shard(self.trainer.global_rank, self.trainer.world_size)

    def configure_model(self) -> None:
        """Load ``init_from`` once per fit/validate run (not in ``load_from_checkpoint``, which has no trainer and
        restores the fine-tuned weights itself)."""
        super().configure_model()
        if self.init_from is None or self._initialised or self._trainer is None:
            return
        fresh = load_backbone_weights(self.backbone, self.init_from, use_ema=self.init_weights == "ema")
        if self.ema_backbone is not None:
            self.ema_backbone.load_state_dict(self.backbone.state_dict())
        self._initialised = True
        rank_zero_info(f"UMD: backbone initialised from {self.init_from}; freshly initialised: {fresh or 'nothing'}")
