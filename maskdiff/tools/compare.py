"""``maskdiff compare``: MAE, DiT, MDT, DiffMAE and UMD pre-trained alike and measured alike, on one table.

    maskdiff compare --config configs/compare/digits.yaml
    maskdiff compare --config configs/compare/digits.yaml --config configs/compare/quick.yaml --out runs/compare_quick

Budget on the 2-core CPU (cpu-2) at the shipped settings: about 15-20 minutes when the machine is idle, estimated
from a 300-step run (17.6 min wall with other jobs loading the cores 3-6x, DiT at 0.35 s a step instead of its
idle 56 ms) and the step-time ratios it measured (images/s: MAE 5.2x DiT, DiffMAE 3.9x, UMD 1.4x, MDT 0.5x): five
pre-trainings of 2,000 steps ≈ 8 min idle, UMD's 500-step class-conditional fine-tune ≈ 1 min, five 300-step
classification fine-tunes ≈ 2 min, three times 300 generated digits with DDIM-50, 300 held-out digits under three
masks for five methods (DDIM-50 RePaint chains) and the probes ≈ 4 min. On a machine as busy as that run's, plan
for about an hour.

The methods are the ones :mod:`maskdiff.comparison` measures; :mod:`maskdiff.comparison.settings` lists every knob.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from maskdiff.comparison.axes import (
    StepTimer,
    evaluate_inpainting,
    inpainting_masks,
    judge_generation,
    parameter_count,
    probe_representation,
)
from maskdiff.comparison.report import (
    check_plotting,
    columns,
    inpainting_panel,
    markdown_table,
    commit_hash,
    run_record,
    write_outputs,
)
from maskdiff.comparison.runs import (
    checkpoint_of,
    classification_config,
    generative_finetune_config,
    pretraining_config,
    run_dir,
    write_config,
)
from maskdiff.comparison.settings import (
    FineTuneSettings,
    GenerationSettings,
    InpaintingSettings,
    MethodSettings,
    PretrainSettings,
    RepresentationSettings,
    GenerativeFineTuneSettings,
)
from maskdiff.errors import UserError
from maskdiff.evaluation.digits_judge import load_digits_judge, score_digits
from maskdiff.evaluation.linear_probe import load_datamodule, train_split_batches
from maskdiff.files import ensure_writable_directory
from maskdiff.methods.base import MaskDiffModule
from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.lightning_cli import MaskDiffCLI

ROOT = Path(__file__).resolve().parents[2]


class Stages:
    """Prints one line per stage with the time since the comparison started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed:7.1f} s] {message}", flush=True)


def find_config(path: str, what: str) -> Path:
    """``path`` from the working directory, else from the maskdiff checkout (the YAML's ``configs/...`` paths)."""
    for candidate in (Path(path).expanduser(), ROOT / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} not found: {path} (looked in {Path.cwd()} and {ROOT})")


def fit(config: Path, callbacks: list | None = None) -> MaskDiffCLI:
    """``maskdiff fit --config config`` in this process, with ``callbacks`` added."""
    cli = MaskDiffCLI(args=["--config", str(config)], run=False)
    cli.trainer.callbacks.extend(callbacks or [])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def classify(config: Path) -> float:
    """Fine-tune a classifier (``maskdiff.methods.FineTune``) and return its held-out top-1."""
    cli = fit(config)
    cli.trainer.limit_val_batches = 1.0
    metrics = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    return float(metrics[0]["val/top1"])


def held_out_digits(datamodule, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` validation digits ``(count, 1, S, S)`` and their labels."""
    images, labels = zip(*[(batch[0], batch[1]) for batch in datamodule.val_dataloader()])
    images, labels = torch.cat(images)[:count], torch.cat(labels)[:count]
    if len(images) < count:
        raise ValueError(f"inpainting.images {count} is more than the {len(images)} held-out digits")
    return images, labels


def check_settings(methods: dict[str, MethodSettings], finetune_settings: GenerativeFineTuneSettings,
                   classification: FineTuneSettings, pretrain: PretrainSettings, inpainting: InpaintingSettings) -> dict[str, Path]:
    """Every config file (by path) and setting checked before any training; returns the methods' config paths."""
    if not methods:
        raise UserError("no methods to compare", hint="maskdiff compare --config configs/compare/digits.yaml")
    paths = {name: find_config(method.config, f"{name}'s config") for name, method in methods.items()}
    if any(method.generation == "finetune" for method in methods.values()):
        find_config(finetune_settings.config, "generative fine-tune config (generative_finetune.config)")
    if classification.steps:
        find_config(classification.config, "classification fine-tune config (finetune.config)")
    for name, method in methods.items():
        if method.generation == "none" and not method.no_generation:
            raise UserError(f"methods.{name}.generation is none but no_generation gives no reason",
                            hint="say in methods.<name>.no_generation why the method is not judged as a generator")
    if pretrain.steps <= pretrain.timing_skip_steps:
        raise UserError(f"pretrain.steps {pretrain.steps} leaves no step to time after pretrain.timing_skip_steps "
                        f"{pretrain.timing_skip_steps}")
    if not inpainting.masks or inpainting.images < 1 or inpainting.panel_images < 1:
        raise UserError("inpainting needs at least one mask, one image and one panel image")
    return paths


def refuse_earlier_runs(out: Path, methods: dict[str, MethodSettings]) -> None:
    """A comparison trains every run afresh: refuse an ``out`` whose method folders hold checkpoints already (a new
    ``last.ckpt`` would be saved beside them as ``last-v1.ckpt`` and the old one evaluated)."""
    for name in methods:
        found = sorted((out / name).glob("*/checkpoints/*.ckpt"))
        if found:
            raise UserError(f"{out / name} holds the checkpoints of an earlier comparison ({found[0]})",
                            hint="give this comparison its own --out, or delete that folder")


def evaluate_method(name: str, method: MethodSettings, out: Path, stage: Stages, settings: dict[str, Any],
                    data: dict[str, Any], seed: int, enabled: bool | None) -> tuple[dict, dict, dict, dict[str, torch.Tensor]]:
    """Every axis for one pre-trained method: ``(figures, reasons, details, completed images per mask)``."""
    generation, inpainting, representation = settings["generation"], settings["inpainting"], settings["representation"]
    figures: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {}
    module: MaskDiffModule = load_method(checkpoint_of(out, name, "pretrain")).eval()
    figures["params_m"] = parameter_count(module) / 1e6

    if method.generation == "none":
        for key in ("digits_fd", "class_consistency", "sample_s_per_image"):
            figures[key], reasons[key] = None, method.no_generation
    else:
        generator = module if method.generation == "native" else load_method(checkpoint_of(out, name, "finetune")).eval()
        stage(f"{name}: generating {10 * generation.per_class} class-conditional digits")
        details["generation"] = judge_generation(generator, generation, seed, enabled)
        details["generation"]["weights"] = "ema" if generator.ema_backbone is not None else "raw"
        details["generation"]["route"] = method.generation
        figures.update({key: details["generation"][key] for key in ("digits_fd", "class_consistency", "sample_s_per_image")})

    stage(f"{name}: inpainting {len(data['images'])} held-out digits under {len(data['masks'])} masks "
          f"({module.inpainting} mode)")
    masks_figures, completed = evaluate_inpainting(module, data["images"], data["labels"], data["masks"], inpainting,
                                                   generation, seed, enabled)
    details["inpainting"] = {"mode": module.inpainting, "masks": masks_figures}
    for kind, values in masks_figures.items():
        figures[f"inpaint_{kind}_psnr"], figures[f"inpaint_{kind}_fd"] = values["psnr"], values["digits_fd"]
    timed = "random" if "random" in masks_figures else next(iter(masks_figures))
    figures["inpaint_s_per_image"] = masks_figures[timed]["s_per_image"]

    stage(f"{name}: probing the frozen encoder ({method.pooling} features"
          f"{', sweeping t' if method.sweep_timesteps else ''})")
    probes = probe_representation(module, method, representation, data["train_batches"], data["val_batches"], seed)
    details["representation"] = probes
    figures.update(linear_top1=probes["linear_top1"], few_shot_top1=probes["few_shot_top1"], feature=probes["feature"])
    figures["finetune_top1"] = None
    reasons["finetune_top1"] = "classification fine-tune skipped (finetune.steps: 0)"
    timestep = 0 if module.backbone.features_take_timesteps else None
    del module
    gc.collect()
    classification: FineTuneSettings = settings["finetune"]
    if classification.steps:
        stage(f"{name}: classification fine-tune, {classification.steps} steps")
        directory = run_dir(out, name, "classify")
        config = classification_config(find_config(classification.config, "finetune.config"), directory,
                                       classification.steps, seed, checkpoint_of(out, name, "pretrain"), timestep,
                                       settings["pretrain"].batch_size)
        figures["finetune_top1"] = classify(write_config(config, directory, "config"))
        reasons.pop("finetune_top1")
        details["finetune"] = {"steps": classification.steps, "timestep": timestep, "top1": figures["finetune_top1"]}
    return figures, reasons, details, completed


def run_comparison(
    methods: dict[str, MethodSettings],
    out: str = "runs/compare",
    seed: int = 0,
    pretrain: PretrainSettings = PretrainSettings(),
    generative_finetune: GenerativeFineTuneSettings = GenerativeFineTuneSettings(),
    generation: GenerationSettings = GenerationSettings(),
    inpainting: InpaintingSettings = InpaintingSettings(),
    representation: RepresentationSettings = RepresentationSettings(),
    finetune: FineTuneSettings = FineTuneSettings(),
    progress: bool | None = None,
) -> str:
    """:func:`compare` with torch's threads set."""
    stage = Stages()
    commit = commit_hash(ROOT)
    paths = check_settings(methods, generative_finetune, finetune, pretrain, inpainting)
    check_plotting()
    out_dir = ensure_writable_directory(Path(out).expanduser(), "--out directory").resolve()
    refuse_earlier_runs(out_dir, methods)
    settings = {"pretrain": pretrain, "generation": generation, "inpainting": inpainting,
                "representation": representation, "finetune": finetune}
    judge_accuracy = load_digits_judge()[1]
    stage(f"digits judge ready (held-out accuracy {judge_accuracy:.3f}); comparing {', '.join(methods)} in {out_dir}")

    runs: dict[str, dict[str, Any]] = {}
    for name, method in methods.items():
        directory = run_dir(out_dir, name, "pretrain")
        config = write_config(pretraining_config(paths[name], pretrain, directory, seed), directory, "config")
        stage(f"{name}: pre-training {pretrain.steps} steps ({paths[name]})")
        timer = StepTimer(pretrain.timing_skip_steps)
        started = time.perf_counter()
        cli = fit(config, [timer])
        runs[name] = {"config": str(config), "fit_s": time.perf_counter() - started,
                      "train_images_per_s": timer.images_per_second, "steps": cli.trainer.global_step}
        del cli
        if method.generation == "finetune":
            directory = run_dir(out_dir, name, "finetune")
            config = write_config(generative_finetune_config(
                find_config(generative_finetune.config, "generative_finetune.config"), pretrain, directory,
                generative_finetune.steps, seed, checkpoint_of(out_dir, name, "pretrain")), directory, "config")
            stage(f"{name}: class-conditional fine-tune, {generative_finetune.steps} steps")
            fit(config)
        gc.collect()

    datamodule = load_datamodule(runs[next(iter(methods))]["config"])
    datamodule.val_batch_size = representation.feature_batch_size
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, labels = held_out_digits(datamodule, inpainting.images)
    token_pixels = pretrain.patch_size
    masks = inpainting_masks(inpainting, len(images), images.shape[-1], token_pixels, seed)
    data = {"images": images, "labels": labels, "masks": masks, "train_batches": lambda: train_split_batches(datamodule),
            "val_batches": datamodule.val_dataloader}
    real_fd = score_digits(images).frechet_distance

    rows, reasons, results, panel = {}, {}, {}, {}
    shown = "random" if "random" in masks else next(iter(masks))
    for name, method in methods.items():
        figures, method_reasons, details, completed = evaluate_method(name, method, out_dir, stage, settings, data,
                                                                      seed, progress)
        figures["train_images_per_s"] = runs[name]["train_images_per_s"]
        rows[name] = {"feature": figures.pop("feature"), **figures}
        reasons[name] = method_reasons
        results[name] = {"figures": figures, "not_applicable": method_reasons, "pretrain": runs[name], **details}
        panel[name] = completed[shown][: inpainting.panel_images]

    originals = images[: inpainting.panel_images]
    greyed = torch.where(masks[shown][: inpainting.panel_images], torch.zeros_like(originals), originals)
    panel_path = inpainting_panel(originals, greyed, panel, out_dir / "inpainting.png")
    table_columns = columns(list(masks), representation.shots)
    notes = [
        f"Pre-training: {pretrain.steps} steps each, batch {pretrain.batch_size}, seed {seed}, backbone width "
        f"{pretrain.hidden_size}, depth {pretrain.depth}, {pretrain.num_heads} heads, patch {pretrain.patch_size} on "
        f"{pretrain.input_size}×{pretrain.input_size} digits; AdamW lr {pretrain.lr}, betas {tuple(pretrain.betas)}, "
        f"weight decay {pretrain.weight_decay}, {pretrain.warmup_steps} warm-up steps then cosine to "
        f"{pretrain.min_lr_ratio}× lr, gradient clip {pretrain.gradient_clip_val}.",
        f"Generation: {10 * generation.per_class} samples (EMA weights), DDIM-{generation.sampler_steps} η "
        f"{generation.eta}, CFG {generation.cfg_scale}; FD = digits Fréchet distance to the 300 held-out digits "
        "(judge features), consistency = share the judge assigns to the requested class"
        + "".join(f"; {name} after a {generative_finetune.steps}-step class-conditional fine-tune of its unlabelled "
                  "pre-training" for name, m in methods.items() if m.generation == "finetune") + ".",
        f"Inpainting: the first {len(images)} held-out digits, the same masks for all (centre box {inpainting.box_ratio} "
        f"of the area, {inpainting.side} half, random {inpainting.random_ratio} of the tokens per digit), each method's "
        f"own mode (MAE reconstructs, DiT/MDT/UMD RePaint with DDIM-{generation.sampler_steps}, DiffMAE its chain on the "
        f"hidden tokens), {'labels given to class-conditional models' if inpainting.conditioned else 'no labels'}; "
        f"PSNR on the hidden pixels; FD of the completed digits (the uncorrupted digits score {real_fd:.2f}). "
        f"Panel: {panel_path.name} ({shown} mask). Inpaint s/img: the {shown} mask.",
        f"Representation: frozen features, BN + linear head (SGD, {representation.epochs} epochs, batch "
        f"{representation.batch_size}, base lr {representation.base_lr}) on the 1,497 training digits, top-1 on the "
        f"300 held-out; {representation.shots}-shot fewshot_lsr (λ {representation.l2_reg}); swept timesteps "
        f"{list(representation.timesteps)} picked on {representation.selection_fraction:.0%} of the training digits. "
        f"Fine-tune: {finetune.steps} steps of {finetune.config}.",
        f"Cost: training images/s over the pre-training steps alone (first {pretrain.timing_skip_steps} skipped); "
        "backbone parameters; sampling and inpainting seconds per image in one batch. Wall time "
        f"{stage.elapsed / 60:.1f} min.",
    ]
    markdown = markdown_table(rows, reasons, table_columns,
                              f"{', '.join(methods)} on digits: {pretrain.steps} pre-training steps each", notes)
    record = run_record({key: asdict(value) for key, value in settings.items()}
                        | {"methods": {name: asdict(method) for name, method in methods.items()},
                           "generative_finetune": asdict(generative_finetune), "seed": seed,
                           "real_digits_fd": real_fd, "judge_accuracy": judge_accuracy},
                        results, commit, stage.elapsed)
    written = write_outputs(out_dir, markdown, record, rows, table_columns)
    print(markdown)
    stage(f"wrote {', '.join(str(path) for path in written)} and {panel_path}")
    return str(out_dir / "compare.md")


def compare(
    methods: dict[str, MethodSettings],
    out: str = "runs/compare",
    seed: int = 0,
    pretrain: PretrainSettings = PretrainSettings(),
    generative_finetune: GenerativeFineTuneSettings = GenerativeFineTuneSettings(),
    generation: GenerationSettings = GenerationSettings(),
    inpainting: InpaintingSettings = InpaintingSettings(),
    representation: RepresentationSettings = RepresentationSettings(),
    finetune: FineTuneSettings = FineTuneSettings(),
    threads: int | None = None,
    progress: bool | None = None,
) -> str:
    """Pre-train every method alike and compare generation, inpainting, representation and cost on one table.

        maskdiff compare --config configs/compare/digits.yaml

    Each method trains from its own config with the shared backbone size, data batch, optimizer, schedule, steps
    and seed (``pretrain``); runs go under ``<out>/<method>/``. Writes ``<out>/compare.md`` (rows = methods, "—" with
    a footnote where an axis does not apply), ``<out>/compare.json`` (every figure, the settings, commit, date and
    machine), ``<out>/compare.png`` (one panel per axis) and ``<out>/inpainting.png`` (a row per method). About 15-20
    minutes on 2 idle CPU cores at configs/compare/digits.yaml; ``--config configs/compare/quick.yaml`` on top: a
    smoke run of about a minute.

    Args:
        methods: name -> :class:`~maskdiff.comparison.settings.MethodSettings` (config, generation route, feature).
        out: output folder.
        seed: seeds every training run, the sampling noise, the masks and the probes.
        pretrain: the shared pre-training knobs.
        generative_finetune: the class-conditional fine-tune of methods with ``generation: finetune`` (UMD).
        generation: class-conditional sampling judged by the digits judge.
        inpainting: masks and held-out digits.
        representation: linear and few-shot probes.
        finetune: classification fine-tune of every encoder.
        threads: torch CPU threads for the whole comparison (None: torch's default; 1 is fastest for tiny models on a
            busy machine).
        progress: progress bars (None: when stderr is a terminal).
    """
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return run_comparison(methods, out, seed, pretrain, generative_finetune, generation, inpainting, representation,
                              finetune, progress)
    finally:
        torch.set_num_threads(previous)
