import csv
import re
import subprocess
import sys

import pytest
import torch
import yaml

from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.corruption import GaussianNoise
from maskdiff.methods import DiT
from maskdiff.samplers import DDIMSampler
from tests.helpers import CONFIGS, DEBUG_CONFIG, ROOT, config_in


def debug_fit(tmp_path, *extra):
    """Train the debug config for a few steps, checkpointing into tmp_path/checkpoints."""
    path, ckpt_dir = config_in(tmp_path)
    main(["fit", "--config", str(path), *extra])
    return path, ckpt_dir


@pytest.mark.parametrize("config", sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "compare"), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses_through_the_cli(config, capsys):
    configs = [str(config)]
    first_line = config.read_text().splitlines()[0]
    if first_line.startswith("# preset of `maskdiff probe`"):  # a probe preset: every value is a probe option
        with pytest.raises(SystemExit) as exit_info:
            main(["probe", "--config", str(config), "--ckpt", "x.ckpt", "--data", "y.yaml", "--print_config"])
        assert exit_info.value.code in (None, 0)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert set(yaml.safe_load(config.read_text())) <= set(printed)
        return
    if first_line.startswith("# overlay:"):  # applied on top of the base config its usage line names
        base = re.search(r"--config (\S+) --config", config.read_text())
        assert base, f"{config} is an overlay but names no base config in a usage line"
        configs = [str(ROOT / base.group(1)), str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[arg for path in configs for arg in ("--config", path)], "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]
    if model["class_path"].endswith("FineTune"):
        assert model["init_args"]["ckpt"]  # the backbone comes from this checkpoint, loaded in configure_model
    else:
        backbone = model["init_args"]["backbone"]
        assert backbone["class_path"].startswith("maskdiff.backbones.")
        assert "hidden_size" in backbone["init_args"]  # components are shown with all their init args
    assert printed["data"]["class_path"].startswith("maskdiff.data.")


def test_configs_merge_and_override(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--config", str(DEBUG_CONFIG),
              "--model.init_args.ema_decay", "0.5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone"]["init_args"]["hidden_size"] == 32  # second file wins
    assert printed["model"]["init_args"]["ema_decay"] == 0.5  # command line wins


def test_fast_dev_run_through_the_cli(tmp_path, digits_cache):
    main(["fit", "--config", str(config_in(tmp_path)[0]), "--trainer.fast_dev_run", "2",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])


def test_fit_load_from_checkpoint_and_sample(tmp_path, digits_cache, capsys):
    _, ckpt_dir = debug_fit(tmp_path, "--trainer.max_steps", "4")
    last = ckpt_dir / "last.ckpt"
    module = load_method(last)
    assert type(module) is DiT
    assert isinstance(module.corruption, GaussianNoise) and isinstance(module.sampler, DDIMSampler)
    assert module.sampler.steps == 10 and module.backbone.hidden_size == 32
    saved = torch.load(last, weights_only=True)["state_dict"]
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert not torch.equal(saved["backbone.final_layer.linear.weight"], saved["ema_backbone.final_layer.linear.weight"])

    outputs = []
    for seed, name in ((0, "a.png"), (0, "b.png"), (1, "c.png")):
        main(["sample", "--ckpt", str(last), "--out", str(tmp_path / name), "--sampler", "ddim", "--steps", "5",
              "--classes", "[0,1,2]", "--per_class", "2", "--seed", str(seed), "--cfg_scale", "2.0"])
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    main(["sample", "--ckpt", str(last), "--out", str(tmp_path / "raw.png"), "--sampler", "ddpm", "--steps", "5",
          "--weights", "raw", "--classes", "[0,1,2]", "--per_class", "2"])
    assert (tmp_path / "raw.png").read_bytes() != outputs[0]


def test_validate_test_and_predict(tmp_path, digits_cache):
    config, ckpt_dir = debug_fit(tmp_path, "--trainer.max_steps", "2")
    for command in ("validate", "test"):
        main([command, "--config", str(config), "--ckpt_path", str(ckpt_dir / "last.ckpt"), "--trainer.limit_" +
              ("val" if command == "validate" else "test") + "_batches", "1"])
    main(["predict", "--config", str(config), "--ckpt_path", str(ckpt_dir / "last.ckpt"),
          "--trainer.limit_predict_batches", "1"])


def test_resume_continues_from_last_checkpoint(tmp_path, digits_cache):
    config, ckpt_dir = debug_fit(tmp_path, "--trainer.max_steps", "3")
    main(["fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 6


# ---------------------------------------------------------------------------------------------- bad input
def test_wrong_config_key_is_rejected_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEBUG_CONFIG), "--model.init_args.backbone.init_args.hiden_size", "64"])
    assert exit_info.value.code != 0
    assert "hiden_size" in capsys.readouterr().err


def test_image_size_not_divisible_by_patch(tmp_path, capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        main(["fit", "--config", str(config_in(tmp_path)[0]), "--model.init_args.backbone.init_args.input_size", "9",
              "--trainer.default_root_dir", str(tmp_path)])
    message = str(error.value) + capsys.readouterr().err
    assert "input size 9 is not divisible by patch size 2" in message


def test_data_that_does_not_fit_the_backbone(tmp_path, digits_cache):
    with pytest.raises(ValueError, match="data image_size 16 .* backbone expects input_size 8"):
        main(["fit", "--config", str(config_in(tmp_path)[0]), "--data.init_args.image_size", "16",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])


def test_missing_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        main(["fit", "--config", str(config_in(tmp_path)[0]), "--ckpt_path", str(missing)])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        main(["sample", "--ckpt", str(missing)])


def test_checkpoint_of_another_architecture(tmp_path, digits_cache):
    _, ckpt_dir = debug_fit(tmp_path, "--trainer.max_steps", "1")
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    from maskdiff.backbones import DiT as DiTBackbone

    wider = DiT(backbone=DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=10))
    with pytest.raises(ValueError, match=r"backbone\.x_embedder\.weight has shape \(32, 4\), this model expects \(64, 4\)"):
        wider.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="not a maskdiff checkpoint"):
        torch.save({"model": {}}, tmp_path / "foreign.pt")
        load_method(tmp_path / "foreign.pt")


def test_objective_and_backbone_must_agree():
    from maskdiff.backbones import DiT as DiTBackbone
    from maskdiff.objectives import DiffusionLoss

    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="learn_sigma"):
        DiT(backbone=backbone, objective=DiffusionLoss(learn_sigma=False))


# ---------------------------------------------------------------------------------------------- example
@pytest.mark.parametrize("run,logged", [("objective", ("train/v_mse", "train/t_bucket_mean")), ("block", ("train/loss",))])
def test_custom_objective_example_runs(tmp_path, digits_cache, run, logged):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_objective.py"), run, "--trainer.max_steps", "10",
         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name = "custom_objective" if run == "objective" else "mae_block_masking"
    metrics = list(csv.DictReader((next((tmp_path / "runs" / name).rglob("metrics.csv"))).open()))
    for key in logged:
        assert any(row.get(key) for row in metrics), key
