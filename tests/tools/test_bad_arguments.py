"""Each bad argument is refused where it is given, naming it: class ids, guidance on an unconditional model, negative
num_classes, batch_size 0, unreadable checkpoints, a --ckpt_path of another model, data that does not fit the model
(all before any data is read); --weights_from is the explicit weights-only start."""

import pytest
import torch
import yaml

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.data.latents import LatentShardsDataModule
from maskdiff.errors import CheckpointError, UserError
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import load_backbone_weights, load_method, write_method_checkpoint
from maskdiff.samplers import ClassifierFreeGuidance
from maskdiff.tools.checkpoint_config import check_checkpoint_config
from maskdiff.tools.lightning_cli import MaskDiffCLI
from maskdiff.tools.main import check_config_files, main
from maskdiff.tools.sample import sample_labels
from maskdiff.tools.sampling import build_sampling
from tests.helpers import config_in

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
        "num_classes": 10}


def tiny_dit(**backbone) -> DiT:
    return DiT(backbone=DiTBackbone(**{**TINY, **backbone}), ema_decay=0.99, clip_x0=1.0)


def lightning_checkpoint(path, class_path="maskdiff.methods.DiT", ema_decay=0.99, **backbone):
    """A checkpoint as `maskdiff fit` saves it (weights, optimizer state, the CLI's hparams) of the debug config's
    model with ``backbone`` init args replaced."""
    init_args = {**TINY, **backbone}
    method = tiny_dit(**backbone)
    hparams = {"_class_path": class_path, "_instantiator": "lightning.pytorch.cli.instantiate_module",
               "backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": init_args}, "ema_decay": ema_decay}
    torch.save({"state_dict": method.state_dict(), "pytorch-lightning_version": "2.6.6", "optimizer_states": [],
                "hyper_parameters": hparams, "global_step": 0, "epoch": 0}, path)
    return path


def method_checkpoint(path, **backbone):
    method = tiny_dit(**backbone)
    init_args = {"backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": {**TINY, **backbone}},
                 "ema_decay": 0.99, "clip_x0": 1.0}
    return write_method_checkpoint(path, "maskdiff.methods.DiT", init_args, method.state_dict())


# ---------------------------------------------------------------------------------------------- item 7: labels
def test_class_ids_must_lie_in_zero_to_num_classes():
    module = tiny_dit()
    assert sample_labels(module, [0, 9], 2).tolist() == [0, 0, 9, 9]
    assert sample_labels(module, None, 1).tolist() == list(range(10))
    with pytest.raises(UserError, match=r"--classes \[10\] outside \[0, 10\).*10 is the null label"):
        sample_labels(module, [3, 10], 1)
    with pytest.raises(UserError, match=r"--classes \[-1\] outside \[0, 10\)"):
        sample_labels(module, [-1], 1)
    with pytest.raises(UserError, match="--classes is empty"):
        sample_labels(module, [], 1)
    unconditional = tiny_dit(num_classes=0)
    assert sample_labels(unconditional, None, 4) is None
    with pytest.raises(UserError, match=r"--classes \[1\]: this checkpoint's model is unconditional") as error:
        sample_labels(unconditional, [1], 1)
    assert "--num" in error.value.hint


def test_sample_refuses_a_bad_count_before_loading(tmp_path):
    with pytest.raises(UserError, match="--per_class and --num must be at least 1, got 0 and 16"):
        main(["sample", "--ckpt", str(tmp_path / "never-read.ckpt"), "--per_class", "0", "--out", str(tmp_path / "g.png")])


def test_guidance_on_an_unconditional_model_is_an_error():
    unconditional = tiny_dit(num_classes=0)
    with pytest.raises(UserError, match=r"guidance \(cfg 2.0 \(constant\), from the command line\) needs a "
                                        r"class-conditional model.*num_classes 0"):
        build_sampling(unconditional, cfg_scale=2.0)
    with pytest.raises(UserError, match="from the preset umd-cfg4.0"):
        build_sampling(unconditional, preset="umd-cfg4.0")
    assert build_sampling(unconditional, cfg_scale=1.0).description.endswith("no guidance")
    unconditional.guidance = ClassifierFreeGuidance(3.0)
    stored = build_sampling(unconditional)
    assert stored.guidance is None and stored.record["cfg"]["source"] == "none"
    conditional = tiny_dit()
    assert build_sampling(conditional, cfg_scale=2.0).guidance.scale == 2.0


def test_negative_num_classes_is_refused_when_the_backbone_is_built():
    with pytest.raises(ValueError, match="num_classes -1 is negative"):
        DiTBackbone(**{**TINY, "num_classes": -1})
    with pytest.raises(ValueError, match="num_classes -3 is negative"):
        UMDBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=-3)
    assert DiTBackbone(**{**TINY, "num_classes": 0}).y_embedder is None


def test_batch_size_zero_is_refused_when_a_data_module_is_built():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        LatentShardsDataModule(train_shards="/never/read-{000..001}.tar", batch_size=0)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("content,reason", [
    (b"", r"the file is empty \(0 bytes\)"),
    (b"hello world\n", r"it is not a torch file \(it begins with b'hello world\\n'\)"),
    (b"model:\n  lr: 1\n", r"it is not a torch file \(it begins with b'model:\\n  lr: 1\\n'\)"),
    ("truncated", r"its 3000 bytes are not a complete torch archive \(truncated or overwritten\?\)"),
    ("pickle", r"it pickles more than tensors and plain data, which weights-only loading refuses \(Unsupported "
               r"global: GLOBAL print was not an allowed global by default\)"),
])
def test_an_unreadable_checkpoint_names_the_file_and_what_was_expected(tmp_path, content, reason):
    path = tmp_path / "bad.ckpt"
    if content == "truncated":
        whole = method_checkpoint(tmp_path / "whole.ckpt").read_bytes()
        content = whole[:3000]
    elif content == "pickle":
        torch.save({"state_dict": {}, "hook": print}, path)
        content = path.read_bytes()
    path.write_bytes(content)
    expected = rf"cannot read {path} as a checkpoint: {reason}; expected a maskdiff checkpoint written by"
    with pytest.raises(CheckpointError, match=expected):
        load_method(path)
    with pytest.raises(CheckpointError, match=reason):
        load_backbone_weights(DiTBackbone(**TINY), path)


@pytest.mark.parametrize("kind,expected", [("dit", "a facebookresearch/DiT .pt file"), ("mdt", "a sail-sg/MDT .pt file"),
                                           ("mae", "a facebookresearch/mae .pth file")])
def test_convert_names_an_unreadable_official_file(tmp_path, kind, expected):
    (tmp_path / "official.pt").write_text("<html>404</html>")
    with pytest.raises(CheckpointError, match=rf"official.pt as a checkpoint: it is not a torch file .*; expected {expected}"):
        main(["convert", kind, str(tmp_path / "official.pt"), str(tmp_path / "out.ckpt")])


def test_a_ckpt_path_of_another_model_is_refused_listing_the_keys(tmp_path):
    config, _ = config_in(tmp_path)
    mae_like = lightning_checkpoint(tmp_path / "mae.ckpt", class_path="maskdiff.methods.MAE")
    narrow = lightning_checkpoint(tmp_path / "narrow.ckpt")
    message = r"holds another model than the config builds: model.class_path: config 'maskdiff.methods.DiT', " \
              r"checkpoint 'maskdiff.methods.MAE'"
    with pytest.raises(CheckpointError, match=message) as error:
        MaskDiffCLI(args=["fit", "--config", str(config), "--ckpt_path", str(mae_like)])
    assert f"--weights_from {mae_like}" in error.value.hint
    with pytest.raises(CheckpointError, match=r"model.init_args.backbone.init_args.hidden_size: config 64, checkpoint 32$"):
        MaskDiffCLI(args=["validate", "--config", str(config), "--ckpt_path", str(narrow),
                          "--model.init_args.backbone.init_args.hidden_size", "64"])


def test_a_ckpt_path_that_cannot_resume_says_why(tmp_path):
    config, _ = config_in(tmp_path)
    weights_only = method_checkpoint(tmp_path / "converted.ckpt")
    with pytest.raises(CheckpointError, match="converted.ckpt holds weights only, no training state") as error:
        MaskDiffCLI(args=["fit", "--config", str(config), "--ckpt_path", str(weights_only)])
    assert error.value.hint == f"start a new run from its weights with --weights_from {weights_only}"
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign.pt is not a Lightning checkpoint \(it holds keys \['model'\]"):
        MaskDiffCLI(args=["test", "--config", str(config), "--ckpt_path", str(tmp_path / "foreign.pt")])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.ckpt as a checkpoint: the file is empty"):
        MaskDiffCLI(args=["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "empty.ckpt")])


def test_other_settings_of_the_checkpoint_are_named_and_the_configs_kept(tmp_path):
    path = lightning_checkpoint(tmp_path / "run.ckpt", ema_decay=0.5)
    config = {"class_path": "maskdiff.methods.DiT",
              "init_args": {"backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": {**TINY, "mlp_ratio": 4.0}},
                            "ema_decay": 0.99, "inpainting": None}}
    assert check_checkpoint_config(config, path, resuming=True) == {"model.init_args.ema_decay": (0.99, 0.5)}


def test_resuming_keeps_the_configs_settings_and_says_which_differ(tmp_path, dit_ckpt, capsys):
    config, _ = config_in(tmp_path)
    cli = MaskDiffCLI(args=["fit", "--config", str(config), "--ckpt_path", str(dit_ckpt), "--trainer.max_steps", "4",
                            "--trainer.limit_val_batches", "0", "--model.init_args.ema_decay", "0.5"])
    assert cli.model.ema_decay == 0.5 and cli.trainer.global_step == 4
    assert "model is built with the config's (the optimizer and scheduler state, learning rates included, come from " \
           "the checkpoint): model.init_args.ema_decay: config 0.5, checkpoint 0.99" in capsys.readouterr().err


def test_weights_from_starts_the_backbone_and_its_ema_from_another_run(tmp_path):
    config, _ = config_in(tmp_path)
    source = method_checkpoint(tmp_path / "pretrained.ckpt")
    saved = torch.load(source, weights_only=True)["state_dict"]
    cli = MaskDiffCLI(args=["--config", str(config), "--weights_from", str(source)], run=False)
    for name, value in cli.model.backbone.state_dict().items():
        assert torch.equal(value, saved[f"ema_backbone.{name}"]), name
        assert torch.equal(cli.model.ema_backbone.state_dict()[name], value), name
    with pytest.raises(ValueError, match="does not fit this backbone"):
        MaskDiffCLI(args=["--config", str(config), "--weights_from", str(source),
                          "--model.init_args.backbone.init_args.hidden_size", "64"], run=False)


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("option,value,message", [
    ("--data.init_args.image_size", "16", r"data image_size 16 gives inputs of side 16 .* backbone expects input_size 8"),
    ("--model.init_args.backbone.init_args.num_classes", "5", "the data has 10 classes but the backbone was built for "
                                                              "num_classes 5"),
])
def test_data_that_does_not_fit_the_model_is_refused_when_built(tmp_path, option, value, message):
    config, _ = config_in(tmp_path)
    with pytest.raises(ValueError, match=message):
        MaskDiffCLI(args=["--config", str(config), option, value], run=False)


@pytest.mark.parametrize("text,message", [
    ("", "is empty; expected a YAML mapping of options"),
    ("# only a comment\n", "is empty"),
    ("- model\n- data\n", "holds a YAML list, not a mapping of options"),
    ("model: [unclosed\n", "is not valid YAML: while parsing a flow sequence"),
])
def test_a_config_file_that_holds_no_options_is_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"config file {path} {message}"):
        check_config_files(["fit", "--config", str(config_in(tmp_path)[0]), f"--config={path}"])
    with pytest.raises(FileNotFoundError, match="config file not found: nope.yaml"):
        check_config_files(["fit", "-c", "nope.yaml"])
    check_config_files(["fit", "--config", yaml.safe_dump({"trainer": {"max_steps": 1}})])
