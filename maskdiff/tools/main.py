"""The ``maskdiff`` command: LightningCLI's fit/validate/test/predict plus maskdiff's own tools.

    maskdiff fit --config configs/quickstart.yaml [--config more.yaml] [--trainer.max_steps 100]
    maskdiff fit --config configs/quickstart.yaml --print_config
    maskdiff sample --ckpt runs/quickstart/checkpoints/last.ckpt --out grid.png --sampler ddim --steps 50
    maskdiff convert dit DiT-XL-2-256x256.pt dit_xl2.ckpt
    maskdiff shards digits data/digits
    maskdiff inpaint --ckpt runs/quickstart/checkpoints/last.ckpt --image digits:0 --mask_kind half --side left --out panel.png
    maskdiff evaluate --ckpt runs/quickstart/checkpoints/last.ckpt --num_samples 1000 --fid false --out eval/quickstart
    maskdiff probe --ckpt runs/quickstart/checkpoints/last.ckpt --data configs/quickstart.yaml --batch_size 256 --optimizer sgd
    maskdiff preflight --config configs/dit/dit_xl2_imagenet256.yaml --config configs/trainer/slurm.yaml --ckpt_path last

``python -m maskdiff.tools.main`` (or ``python -m maskdiff.tools``) is the same command, e.g. under ``torchrun``.
"""

from __future__ import annotations

import inspect
import sys

from jsonargparse import CLI, ArgumentParser

from maskdiff.tools.convert import CONVERTERS
from maskdiff.tools.evaluate import evaluate
from maskdiff.tools.inpaint import inpaint
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.tools.preflight import preflight
from maskdiff.tools.probe import probe
from maskdiff.tools.sample import sample
from maskdiff.tools.shards import SHARD_WRITERS

COMMANDS = {
    "fit": "train a method: maskdiff fit --config configs/quickstart.yaml",
    "validate": "validation loop of a config and checkpoint: maskdiff validate --config C.yaml --ckpt_path last.ckpt",
    "test": "test loop of a config and checkpoint: maskdiff test --config C.yaml --ckpt_path last.ckpt",
    "predict": "prediction loop of a config and checkpoint: maskdiff predict --config C.yaml --ckpt_path last.ckpt",
    "sample": "a PNG grid of samples: maskdiff sample --ckpt last.ckpt --out grid.png",
    "evaluate": "N samples as an ADM .npz, scored (FID, IS, precision/recall): maskdiff evaluate --ckpt last.ckpt",
    "inpaint": "fill a masked image or clip: maskdiff inpaint --ckpt last.ckpt --image digits:0 --mask_kind half",
    "probe": "offline linear probe of frozen features: maskdiff probe --ckpt last.ckpt --data configs/quickstart.yaml",
    "convert": "official or sharded FSDP weights -> a checkpoint: maskdiff convert dit|mdt|mae|fsdp SRC OUT",
    "shards": "write WebDataset shards: maskdiff shards digits|images|moving-digits|videos|latents ... OUT",
    "preflight": "check a fit command line against SLURM/CUDA: maskdiff preflight --config C.yaml",
}
TOOLS = {"sample": (sample, False), "probe": (probe, False), "inpaint": (inpaint, False), "evaluate": (evaluate, False),
         "convert": (CONVERTERS, True), "shards": (SHARD_WRITERS, True)}


class ToolParser(ArgumentParser):
    """jsonargparse's parser; a command's ``--help`` starts with its docstring's first line and its example."""

    def add_function_arguments(self, function, *args, **kwargs):
        added = super().add_function_arguments(function, *args, **kwargs)
        lines = [line.strip() for line in (inspect.getdoc(function) or "").splitlines()]
        example = next((line for line in lines if line.startswith("maskdiff ")), None)
        self.description = lines[0] + (f" Example: {example}" if example else "")
        return added


def usage() -> str:
    """Every command with one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: maskdiff COMMAND [options]   (maskdiff COMMAND --help: the command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``maskdiff`` console script; ``argv`` defaults to ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] == "preflight":
        preflight(args[1:])
        return
    if args[0] in TOOLS:
        component, positional = TOOLS[args[0]]
        CLI({args[0]: component}, args=args, as_positional=positional,
            parser_class=ToolParser, prog="maskdiff")
        return
    MaskDiffCLI(args=argv)


if __name__ == "__main__":
    main()
