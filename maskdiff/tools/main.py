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
    maskdiff compare --config configs/compare/digits.yaml
    maskdiff plot runs/quickstart runs/mdt_digits --out runs.png

``python -m maskdiff.tools.main`` (or ``python -m maskdiff.tools``) is the same command, e.g. under ``torchrun``.

A mistake of the user (a config value, a path, a checkpoint, data, an argument; also a run stopped by the
non-finite guards) is printed as one line,
``maskdiff: error: <message>`` (and at most one ``hint:`` line), with exit code 2 and no traceback;
``MASKDIFF_DEBUG=1`` shows the traceback. A bug (any other exception) shows its traceback.
"""

from __future__ import annotations

import errno
import inspect
import os
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import CLI, ArgumentError, ArgumentParser
from lightning.fabric.utilities.exceptions import MisconfigurationException

from maskdiff.errors import UserError
from maskdiff.files import WriteError
from maskdiff.tools.compare import compare
from maskdiff.tools.convert import CONVERTERS
from maskdiff.tools.evaluate import evaluate
from maskdiff.tools.inpaint import inpaint
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.tools.plot import plot_command
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
    "convert": "official or sharded FSDP weights -> a checkpoint: maskdiff convert dit|mdt|mae|umd|fsdp SRC OUT",
    "shards": "write WebDataset shards: maskdiff shards digits|images|moving-digits|videos|latents ... OUT",
    "preflight": "check a fit command line against SLURM/CUDA: maskdiff preflight --config C.yaml",
    "compare": "all five methods alike, one table: maskdiff compare --config configs/compare/digits.yaml",
    "plot": "the logged curves of runs in one PNG: maskdiff plot runs/quickstart [RUN_DIR ...] --out runs.png",
}
TOOLS = {"sample": (sample, False), "probe": (probe, False), "inpaint": (inpaint, False), "evaluate": (evaluate, False),
         "convert": (CONVERTERS, True), "shards": (SHARD_WRITERS, True), "compare": (compare, False)}


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


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
               WriteError, FloatingPointError, ArgumentError, MisconfigurationException)
PATH_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOSPC,
               errno.EDQUOT, errno.EROFS)
WRAPPERS = ("Does not validate against any of the Union subtypes", "Problem with given class_path")
PARSER_NOISE = ("Subtypes:", "Errors:", "Given value type:", "Given value:", "Expected a <class 'NoneType'>",
                WRAPPERS[0])
MAX_MESSAGE = 1000
TENSORBOARD_MISSING = "Neither `tensorboard` nor `tensorboardX` is available"  # Lightning's TensorBoardLogger


def user_mistake(error: BaseException) -> BaseException | None:
    """The exception that says what the user got wrong, or ``None`` for a bug: ``error`` itself, or, where
    jsonargparse wrapped the error of a constructor it called for the config, the constructor's error (a bug in a
    constructor, such as an ``AssertionError``, stays a bug)."""
    if isinstance(error, ArgumentError):
        return error
    while not isinstance(error, UserError) and error.__cause__ is not None and str(error).startswith(WRAPPERS):
        error = error.__cause__
    if isinstance(error, USER_ERRORS) or (isinstance(error, OSError) and error.errno in PATH_ERRNOS):
        return error
    if isinstance(error, ModuleNotFoundError) and str(error).startswith(TENSORBOARD_MISSING):
        return UserError("the logger lightning.pytorch.loggers.TensorBoardLogger needs tensorboard, which is not "
                         "installed", hint="pip install 'maskdiff[tensorboard]' (or log to CSV files: "
                                           "--trainer.logger lightning.pytorch.loggers.CSVLogger)")
    return None


def one_line(message: str) -> str:
    """``message`` as one line of at most :data:`MAX_MESSAGE` characters: a DataLoader worker's error without the
    worker's traceback, jsonargparse's nested report as ``model.init_args.backbone.init_args.depth: <problem>``."""
    if "Original Traceback (most recent call last):" in message:
        message = re.sub(r"^[\w.]+: ", "", message.strip().splitlines()[-1])
    lines = (line.strip() for line in message.splitlines())
    kept = [line.removeprefix("- ") for line in lines if line]
    text = " ".join(line for line in kept if not line.startswith(PARSER_NOISE))
    text = re.sub(r'Parser key "([^"]+)":', r"\1:", " ".join(text.split()))
    nested = re.compile(r"([\w.]+): Problem with given class_path '[^']+': ([\w.]+):")
    while nested.search(text):
        text = nested.sub(r"\1.init_args.\2:", text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def report(error: BaseException, command: str | None = None) -> list[str] | None:
    """What the command prints for ``error``: ``maskdiff: error: <message>`` and, when there is one, ``hint: <hint>``
    (a :class:`~maskdiff.errors.UserError`'s hint; for a command line that does not parse, where ``command``'s
    options are listed); ``None`` for a bug, whose traceback is shown."""
    mistake = user_mistake(error)
    if mistake is None:
        return None
    lines = [f"maskdiff: error: {one_line(str(mistake))}"]
    hint = mistake.hint if isinstance(mistake, UserError) else None
    if hint is None and isinstance(mistake, ArgumentError):
        listing = f"maskdiff {command} --help" if command in COMMANDS else None
        hint = f"{listing} lists its options" if listing else "maskdiff --help lists the commands"
    return lines + ([f"hint: {one_line(hint)}"] if hint else [])


def config_files(args: list[str]) -> list[str]:
    """The values of every ``--config``/``-c`` option in ``args``."""
    found = [value for option, value in zip(args, args[1:]) if option in ("--config", "-c")]
    return found + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` file that is missing, empty, not YAML, or not a mapping of options, naming it (a
    ``--config`` value that is not a path, such as inline YAML, is left to the parser)."""
    for value in config_files(args):
        path = Path(value).expanduser()
        if not path.is_file():
            if path.suffix in (".yaml", ".yml", ".json"):
                raise FileNotFoundError(f"config file not found: {value}")
            continue
        try:
            loaded = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise UserError(f"config file {value} is not valid YAML: {one_line(str(error))}") from error
        if loaded is None:
            raise UserError(f"config file {value} is empty; expected a YAML mapping of options",
                            hint="e.g. copy configs/quickstart.yaml, or print a full config with --print_config")
        if not isinstance(loaded, dict):
            raise UserError(f"config file {value} holds a YAML {type(loaded).__name__}, not a mapping of options "
                            "(model:, data:, trainer:, ...)")


def run(argv: list[str] | None = None, exit_on_error: bool = True) -> None:
    """Run one ``maskdiff`` command line (``argv`` defaults to ``sys.argv[1:]``); errors propagate. A command line
    that does not parse exits with code 2 after the parser's message, or with ``exit_on_error=False`` raises
    jsonargparse's ``ArgumentError``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] not in COMMANDS and not args[0].startswith("-"):
        raise UserError(f"unknown command {args[0]!r}", hint="maskdiff --help lists the commands")
    check_config_files(args)
    if args[0] == "preflight":
        preflight(args[1:], exit_on_error=exit_on_error)
        return
    if args[0] == "plot":
        plot_command(args[1:], exit_on_error=exit_on_error)
        return
    if args[0] in TOOLS:
        component, positional = TOOLS[args[0]]
        CLI({args[0]: component}, args=args, as_positional=positional,
            parser_class=ToolParser, prog="maskdiff", exit_on_error=exit_on_error)
        return
    MaskDiffCLI(args=argv, parser_kwargs={"exit_on_error": exit_on_error})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``maskdiff`` console script: :func:`run` on ``sys.argv[1:]``, with a user error printed
    by :func:`report` and exit code 2 (``MASKDIFF_DEBUG=1``: its traceback instead).

    Called with ``argv`` (from Python, e.g. a test or a notebook), it is ``run(argv)``: errors propagate.

    The working directory goes first on ``sys.path``, as with ``python -m``: a ``class_path`` may name a module of
    the user's own (``--model.init_args.objective my_objective.VelocityLoss``) without ``PYTHONPATH=.``.
    """
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if argv is not None:
        run(argv)
        return
    try:
        run(exit_on_error=False)
    except Exception as error:  # noqa: BLE001 -- report() tells a user's mistake from a bug, which is re-raised
        lines = report(error, sys.argv[1] if len(sys.argv) > 1 else None)
        if lines is None or os.environ.get("MASKDIFF_DEBUG", "") not in ("", "0"):
            raise
        sys.stdout.flush()
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
