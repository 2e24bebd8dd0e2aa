"""How every command samples: the checkpoint's sampler and guidance, with what the command line overrides.

Each sampling option of ``sample``, ``evaluate`` and ``inpaint`` defaults to ``None``: "as the checkpoint says".
A UMD checkpoint samples with its DDIM-125, η = 1; ``--steps 50`` alone gives DDIM-50, η = 1; ``--sampler ddpm``
alone gives DDPM-125. A method that configures no sampler generates with DDPM-250 (:class:`DDPMSampler`'s default),
as :meth:`~maskdiff.methods.MaskDiffModule.generate` does.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from maskdiff.autoencoders.vae import StableDiffusionVAE
from maskdiff.errors import UserError
from maskdiff.methods.base import MaskDiffModule
from maskdiff.samplers.base import Sampler
from maskdiff.samplers.ddim import DDIMSampler
from maskdiff.samplers.ddpm import DDPMSampler
from maskdiff.samplers.first_step import FirstStepSampler
from maskdiff.samplers.guidance import ClassifierFreeGuidance
from maskdiff.samplers.presets import preset as sampling_preset

SamplerName = Literal["ddpm", "ddim", "first_step"]
GuidanceSchedule = Literal["constant", "power_cosine"]
ONE_STEP = "one-step reconstruction (no sampler)"


class Sampling(NamedTuple):
    """What a command samples with.

    Attributes:
        sampler: the sampler to pass to ``generate``/``inpaint``.
        guidance: the classifier-free guidance to pass (``None``: the checkpoint stores none and none was asked).
        description: one line for the command's output, e.g. ``ddim-125 (η 1.0), cfg 1.5 (constant)``.
        record: the settings for a JSON record: ``sampler``, ``steps``, ``spacing``, ``eta`` (DDIM only),
            ``ddpm_variance`` (DDPM only), ``sampler_source`` and ``cfg`` (:func:`guidance_record`).
    """

    sampler: Sampler
    guidance: ClassifierFreeGuidance | None
    description: str
    record: dict[str, Any]


def build_sampler(configured: Sampler, name: SamplerName | None = None, steps: int | None = None,
                  eta: float | None = None) -> Sampler:
    """``configured`` with the given overrides: ``name`` changes the kind (keeping ``configured``'s steps, its
    timestep spacing for DDIM, and its η or variance when the kind stays), ``steps`` the respaced steps, ``eta``
    DDIM's η; no override returns ``configured`` itself."""
    if name is None and steps is None and eta is None:
        return configured
    kind = name or configured.name
    if kind == "first_step":
        if steps is not None or eta is not None:
            raise ValueError("the first_step sampler makes one call at t = T-1: it takes no --steps or --eta")
        return FirstStepSampler()
    steps = configured.steps if steps is None else steps
    if kind == "ddim":
        if eta is None:
            eta = configured.eta if isinstance(configured, DDIMSampler) else 0.0
        return DDIMSampler(steps, eta, configured.spacing)
    if eta is not None:
        raise ValueError(f"--eta is DDIM's η, but the sampler is {kind}; add --sampler ddim")
    if kind == "ddpm":
        variance = configured.fixed_variance if isinstance(configured, DDPMSampler) else "large"
        return DDPMSampler(steps, variance)
    raise ValueError(f"the checkpoint's sampler {type(configured).__name__} cannot be changed from the command line; "
                     "choose --sampler ddpm, ddim or first_step")


def build_guidance(
    configured: ClassifierFreeGuidance | None,
    scale: float | None = None,
    channels: int | Literal["all"] | None = None,
    schedule: GuidanceSchedule | None = None,
    power: float | None = None,
) -> ClassifierFreeGuidance | None:
    """``configured`` with the given fields replaced (``channels="all"``: guide every channel); no override returns
    ``configured`` itself. Without a configured guidance, a new one needs ``scale``."""
    if scale is None and channels is None and schedule is None and power is None:
        return configured
    if configured is None and scale is None:
        raise ValueError("--cfg_channels, --cfg_schedule and --cfg_power shape guidance, but the checkpoint stores "
                         "none: give --cfg_scale too")
    base = configured or ClassifierFreeGuidance()
    return ClassifierFreeGuidance(
        base.scale if scale is None else scale,
        base.channels if channels is None else (None if channels == "all" else channels),
        base.schedule if schedule is None else schedule,
        base.power if power is None else power,
    )


def describe_sampler(sampler: Sampler) -> str:
    """``ddpm-250``, ``ddim-125 (η 1.0)`` or ``first step (x̂0 at t = T-1)``."""
    if isinstance(sampler, FirstStepSampler):
        return "first step (x̂0 at t = T-1)"
    if isinstance(sampler, DDIMSampler):
        return f"ddim-{sampler.steps} (η {sampler.eta})"
    return f"{sampler.name}-{sampler.steps}"


def describe_guidance(guidance: ClassifierFreeGuidance | None) -> str:
    """``cfg 1.5 (constant)`` or ``no guidance``."""
    if guidance is None or not guidance.active:
        return "no guidance"
    return f"cfg {guidance.scale} ({guidance.schedule})"


def guidance_record(guidance: ClassifierFreeGuidance | None, source: str) -> dict[str, Any]:
    """The guidance used, for JSON: scale, channels, schedule, power (power-cosine only) and where it came from."""
    if guidance is None or not guidance.active:
        return {"scale": 1.0 if guidance is None else guidance.scale, "channels": None, "schedule": None,
                "power": None, "source": source if guidance is not None else "none"}
    return {"scale": guidance.scale, "channels": guidance.channels, "schedule": guidance.schedule,
            "power": guidance.power if guidance.schedule == "power_cosine" else None, "source": source}


def sampler_record(sampler: Sampler, source: str) -> dict[str, Any]:
    """The sampler used, for JSON: its kind, steps, timestep spacing, η (DDIM), fixed variance (DDPM) and where it
    came from."""
    return {
        "sampler": sampler.name,
        "steps": sampler.steps,
        "spacing": sampler.spacing,
        "eta": sampler.eta if isinstance(sampler, DDIMSampler) else None,
        "ddpm_variance": sampler.fixed_variance if isinstance(sampler, DDPMSampler) else None,
        "sampler_source": source,
    }


def guidance_for(module: MaskDiffModule, guidance: ClassifierFreeGuidance | None,
                 source: str) -> ClassifierFreeGuidance | None:
    """``guidance`` for ``module``: guidance asked for an unconditional model (on the command line or by a preset)
    is a :class:`~maskdiff.errors.UserError`, as it would change nothing; a checkpoint's own guidance on one is
    dropped (it never applies without labels)."""
    if module.conditional or guidance is None or not guidance.active:
        return guidance
    if source == "checkpoint":
        return None
    raise UserError(f"classifier-free guidance ({describe_guidance(guidance)}, from the {source}) needs a "
                    "class-conditional model, but this checkpoint's backbone is unconditional (num_classes 0)",
                    hint="drop --cfg_scale (or choose a preset without guidance)")


def build_sampling(
    module: MaskDiffModule,
    sampler: SamplerName | None = None,
    steps: int | None = None,
    eta: float | None = None,
    cfg_scale: float | None = None,
    cfg_channels: int | Literal["all"] | None = None,
    cfg_schedule: GuidanceSchedule | None = None,
    cfg_power: float | None = None,
    preset: str | None = None,
) -> Sampling:
    """The sampler and guidance a command uses on ``module``: the method's configured ones (``module.sampler``,
    else :meth:`~maskdiff.methods.MaskDiffModule.chosen_sampler`'s DDPM-250; ``module.guidance``), or a paper's
    ``preset`` (:mod:`maskdiff.samplers.presets`), with every option that is not ``None`` overriding its part.

    A method that cannot generate (no noise schedule, e.g. MAE) reconstructs in one step: its options are ignored.
    """
    configured = module.chosen_sampler(None)
    if module.corruption.schedule is None:
        return Sampling(configured, None, ONE_STEP, {**sampler_record(configured, "unused"),
                                                     "cfg": guidance_record(None, "none")})
    chosen_preset = sampling_preset(preset) if preset is not None else None
    start_sampler = chosen_preset.make_sampler() if chosen_preset else configured
    start_guidance = chosen_preset.make_guidance() if chosen_preset else module.guidance
    chosen = build_sampler(start_sampler, sampler, steps, eta)
    guidance = build_guidance(start_guidance, cfg_scale, cfg_channels, cfg_schedule, cfg_power)
    start_source = f"preset {preset}" if chosen_preset else None
    if chosen is not start_sampler:
        sampler_source = "command line"
    else:
        sampler_source = start_source or ("checkpoint" if module.sampler is not None else "default")
    guidance_source = (start_source or "checkpoint") if guidance is start_guidance else "command line"
    guidance = guidance_for(module, guidance, guidance_source)
    description = f"{describe_sampler(chosen)}, {describe_guidance(guidance)}"
    record = {**sampler_record(chosen, sampler_source), "cfg": guidance_record(guidance, guidance_source)}
    if chosen_preset:
        decoder = module.autoencoder.path if isinstance(module.autoencoder, StableDiffusionVAE) else None
        record["preset"] = {**chosen_preset.record(), "vae_used": decoder}
        description += f", preset {preset}"
        if decoder is not None and not decoder.rstrip("/").endswith(chosen_preset.vae):
            description += f" (note: the paper decoded with {chosen_preset.vae}, this checkpoint's VAE is {decoder})"
    return Sampling(chosen, guidance, description, record)
