"""What a ``maskdiff fit`` run gives around the training loop: the learning rate logged, checkpoints in the run's own
directory (and never beside another run's), and components from the user's working directory."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import pytest
import yaml
from jsonargparse import Namespace

from maskdiff.errors import UserError
from maskdiff.launch.directories import (
    refuse_occupied_checkpoint_directories,
    root_checkpoint_directories,
    root_log_directories,
)
from maskdiff.tools.main import main
from tests.helpers import DEBUG_CONFIG, config_in

PEAK, WARMUP, MIN_RATIO, STEPS = 0.001, 1, 0.5, 4
SCHEDULE = ["--model.init_args.lr_scheduler", "maskdiff.optim.WarmupCosineLR",
            "--model.init_args.lr_scheduler.init_args.warmup_steps", str(WARMUP),
            "--model.init_args.lr_scheduler.init_args.min_lr_ratio", str(MIN_RATIO)]


def run_config(tmp_path):
    """The debug config with its logs under tmp_path and its ModelCheckpoint's dirpath left null."""
    config, _ = config_in(tmp_path)
    values = yaml.safe_load(config.read_text())
    values["trainer"]["callbacks"][0]["init_args"]["dirpath"] = None
    config.write_text(yaml.safe_dump(values))
    return config


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, digits_cache):
    """A 4-step fit with a cosine schedule of null length into run/; returns (config, run directory)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    config, root = run_config(tmp_path), tmp_path / "run"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(STEPS),
          "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", *SCHEDULE])
    return config, root


def test_the_learning_rate_is_logged_per_step_and_follows_the_run_length(first_run):
    _, root = first_run
    rows = list(csv.DictReader(next((root.parent / "logs").rglob("metrics.csv")).open()))
    logged = {int(row["step"]): float(row["lr-AdamW/pg1"]) for row in rows if row.get("lr-AdamW/pg1")}
    cosine = [PEAK * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))))
              for step in range(WARMUP, STEPS)]
    assert logged == pytest.approx(dict(enumerate([PEAK * 1 / WARMUP, *cosine][:STEPS])), rel=1e-9)


def test_checkpoints_go_to_the_run_directory(first_run):
    _, root = first_run
    assert (root / "checkpoints" / "last.ckpt").is_file()


def test_a_second_run_into_the_same_directory_is_refused_unless_it_resumes(first_run):
    config, root = first_run
    with pytest.raises(UserError, match=rf"^checkpoint directory {root / 'checkpoints'} already holds .*last\.ckpt.*"
                                        r"--ckpt_path last.*--trainer\.default_root_dir"):
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1"])
    assert sorted(path.name for path in (root / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_print_config_shows_the_lr_monitor_and_the_null_dirpath(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEBUG_CONFIG), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lr_monitor"]["logging_interval"] == "step"
    assert printed["trainer"]["callbacks"][0]["init_args"]["dirpath"] is None


def test_a_null_dirpath_becomes_the_root_checkpoints_and_an_explicit_one_stays(tmp_path):
    def checkpoint(dirpath):
        return Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=dirpath))

    config = Namespace(trainer=Namespace(default_root_dir=str(tmp_path / "b"),
                                         callbacks=[checkpoint(None), checkpoint("elsewhere")]))
    root_checkpoint_directories(config)
    assert [c.init_args.dirpath for c in config.trainer.callbacks] == [str(tmp_path / "b" / "checkpoints"), "elsewhere"]


def test_a_checkpoint_that_overwrites_its_files_may_share_a_directory(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")

    def config(**init_args):
        return {"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                           "init_args": {"dirpath": str(tmp_path), **init_args}}]}}

    refuse_occupied_checkpoint_directories(config(enable_version_counter=False))
    with pytest.raises(UserError, match=f"checkpoint directory {tmp_path} already holds"):
        refuse_occupied_checkpoint_directories(config(enable_version_counter=True))
    refuse_occupied_checkpoint_directories(config(dirpath=str(tmp_path / "empty")))


MY_OBJECTIVE = '''
from maskdiff.diffusion import Parameterization
from maskdiff.objectives import Objective, ObjectiveOutput


class MyObjective(Objective):
    needs_noise = True
    parameterization = Parameterization("eps")

    def forward(self, prediction, view):
        return ObjectiveOutput(loss=((prediction - view.noise) ** 2).mean())
'''


def test_a_component_of_the_working_directory_resolves_without_pythonpath(tmp_path, monkeypatch, capsys):
    """As the ``maskdiff`` console script runs: sys.path holds its bin directory, not the working directory."""
    (tmp_path / "my_objective.py").write_text(MY_OBJECTIVE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", os.getcwd())])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert importlib.util.find_spec("my_objective") is None
    monkeypatch.setattr(sys, "argv", ["maskdiff", "fit", "--config", str(DEBUG_CONFIG), "--print_config",
                                      "--model.init_args.objective", "my_objective.MyObjective"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code in (None, 0)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["objective"]["class_path"] == \
        "my_objective.MyObjective"


def test_a_logger_kept_in_the_files_run_directory_follows_a_moved_run(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"default_root_dir": "runs/base", "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "base"}}}}))

    def parsed(root: str, save_dir: str = "runs", name: str = "base") -> Namespace:
        logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                           init_args=Namespace(save_dir=save_dir, name=name))
        return Namespace(config=[base], trainer=Namespace(default_root_dir=root, logger=logger))

    moved = parsed("runs/other")
    assert root_log_directories(moved) == ["CSVLogger logs to runs/other (the run's default_root_dir), not runs/base"]
    assert (moved.trainer.logger.init_args.save_dir, moved.trainer.logger.init_args.name) == ("runs", "other")
    deeper = parsed("/scratch/job7/run")
    root_log_directories(deeper)
    assert (deeper.trainer.logger.init_args.save_dir, deeper.trainer.logger.init_args.name) == ("/scratch/job7", "run")
    own_place = parsed("runs/other", save_dir="/logs", name="mine")  # a logger given its own place keeps it
    assert root_log_directories(own_place) == [] and own_place.trainer.logger.init_args.save_dir == "/logs"
    unmoved = parsed("runs/base")
    assert root_log_directories(unmoved) == [] and unmoved.trainer.logger.init_args.name == "base"
