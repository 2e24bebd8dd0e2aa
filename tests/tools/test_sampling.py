"""Every command samples with the checkpoint's sampler and guidance unless the command line overrides a part."""

import json

import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.backbones import create_backbone
from maskdiff.callbacks.sample_grid import save_grid
from maskdiff.methods import MAE, UMD, DiT
from maskdiff.methods.checkpoints import load_method, write_method_checkpoint
from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler, FirstStepSampler
from maskdiff.tools.main import main
from maskdiff.tools.sampling import ONE_STEP, build_sampling

pytestmark = pytest.mark.usefixtures("one_thread")

NANO_UMD = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2,
            "decoder_depth": 1}
TINY_DIT = {"input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
            "num_classes": 10}


@pytest.fixture(scope="module")
def umd_ckpt(tmp_path_factory):
    """An untrained nano UMD saved with no sampler in its config: UMD's own default, DDIM-125 with η = 1."""
    torch.manual_seed(0)
    method = UMD(backbone=UMDBackbone(**NANO_UMD), ema_decay=None)
    init_args = {"backbone": {"class_path": "maskdiff.backbones.UMD", "init_args": NANO_UMD}, "ema_decay": None}
    path = tmp_path_factory.mktemp("umd") / "umd.ckpt"
    return write_method_checkpoint(path, "maskdiff.methods.UMD", init_args, method.state_dict())


def sample_line(capsys) -> str:
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote"))


def test_sample_uses_the_checkpoints_ddim_125_with_eta_1(umd_ckpt, tmp_path, capsys):
    out = tmp_path / "grid.png"
    main(["sample", "--ckpt", str(umd_ckpt), "--out", str(out), "--num", "2", "--seed", "3"])
    assert "ddim-125 (η 1.0), no guidance" in sample_line(capsys)

    module = load_method(umd_ckpt).eval()
    assert isinstance(module.sampler, DDIMSampler) and (module.sampler.steps, module.sampler.eta) == (125, 1.0)
    expected = module.generate(num=2, sampler=DDIMSampler(125, 1.0), generator=torch.Generator().manual_seed(3))
    assert out.read_bytes() == save_grid(expected, tmp_path / "expected.png", 8).read_bytes()


@pytest.mark.parametrize(("options", "used"), [
    (["--steps", "3"], "ddim-3 (η 1.0)"),
    (["--eta", "0.0", "--steps", "2"], "ddim-2 (η 0.0)"),
    (["--sampler", "ddpm", "--steps", "2"], "ddpm-2"),
])
def test_sample_overrides_only_what_is_given(umd_ckpt, tmp_path, capsys, options, used):
    main(["sample", "--ckpt", str(umd_ckpt), "--out", str(tmp_path / "grid.png"), "--num", "1", *options])
    assert f"{used}, no guidance" in sample_line(capsys)


def test_sample_shows_a_bar_of_the_samplers_steps_only_when_asked(umd_ckpt, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "MASKDIFF_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    command = ["sample", "--ckpt", str(umd_ckpt), "--out", str(tmp_path / "grid.png"), "--num", "1", "--steps", "4"]
    main(command)  # stderr is no terminal under pytest: no bar, so CI logs stay clean
    assert "sampling 1 image" not in capsys.readouterr().err
    monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
    main(command)
    bar = capsys.readouterr().err
    assert "sampling 1 image:" in bar and "5/5" in bar  # DDIM-4 on UMD's big_vision grid: 4 steps + the call at t = 0
    main([*command, "--progress", "false"])
    assert "sampling 1 image" not in capsys.readouterr().err


def test_each_override_keeps_the_rest_of_the_checkpoints_sampler(umd_ckpt):
    module = load_method(umd_ckpt)
    default = build_sampling(module)
    assert default.sampler is module.sampler and default.guidance is None
    assert default.description == "ddim-125 (η 1.0), no guidance"
    assert {key: default.record[key] for key in ("sampler", "steps", "eta", "ddpm_variance", "sampler_source")} == {
        "sampler": "ddim", "steps": 125, "eta": 1.0, "ddpm_variance": None, "sampler_source": "checkpoint"}

    def chosen(**options):
        sampler = build_sampling(module, **options).sampler
        return type(sampler), sampler.steps, getattr(sampler, "eta", None)

    assert chosen(steps=50) == (DDIMSampler, 50, 1.0)
    assert chosen(sampler="ddim") == (DDIMSampler, 125, 1.0)
    assert chosen(eta=0.0) == (DDIMSampler, 125, 0.0)
    assert chosen(sampler="ddpm") == (DDPMSampler, 125, None)
    assert chosen(sampler="first_step") == (FirstStepSampler, 1, None)
    assert build_sampling(module, steps=50).record["sampler_source"] == "command line"
    with pytest.raises(ValueError, match="--eta is DDIM's η, but the sampler is ddpm"):
        build_sampling(module, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="first_step sampler .* takes no --steps"):
        build_sampling(module, sampler="first_step", steps=10)


def test_switching_the_kind_keeps_the_checkpoints_steps_and_takes_the_new_kinds_eta():
    torch.manual_seed(0)
    module = DiT(backbone=DiTBackbone(**TINY_DIT))
    sampling = build_sampling(module)
    assert isinstance(sampling.sampler, DDPMSampler) and sampling.sampler.steps == 250
    assert sampling.description == "ddpm-250, no guidance"
    ddim = build_sampling(module, sampler="ddim").sampler
    assert isinstance(ddim, DDIMSampler) and (ddim.steps, ddim.eta) == (250, 0.0)


def test_guidance_overrides_replace_only_the_fields_given():
    torch.manual_seed(0)
    stored = ClassifierFreeGuidance(3.8, 1, "power_cosine", 4.0)
    module = DiT(backbone=DiTBackbone(**TINY_DIT), guidance=stored)
    sampling = build_sampling(module)
    assert sampling.guidance is stored and sampling.description.endswith("cfg 3.8 (power_cosine)")
    assert sampling.record["cfg"] == {"scale": 3.8, "channels": 1, "schedule": "power_cosine", "power": 4.0,
                                      "source": "checkpoint"}
    scaled = build_sampling(module, cfg_scale=2.0).guidance
    assert (scaled.scale, scaled.channels, scaled.schedule, scaled.power) == (2.0, 1, "power_cosine", 4.0)
    reshaped = build_sampling(module, cfg_channels="all", cfg_schedule="constant").guidance
    assert (reshaped.scale, reshaped.channels, reshaped.schedule) == (3.8, None, "constant")
    assert build_sampling(module, cfg_scale=1.0).description.endswith("no guidance")

    plain = DiT(backbone=DiTBackbone(**TINY_DIT))
    assert build_sampling(plain).guidance is None
    guided = build_sampling(plain, cfg_scale=2.0, cfg_channels=1)
    assert guided.record["cfg"] == {"scale": 2.0, "channels": 1, "schedule": "constant", "power": None,
                                    "source": "command line"}
    with pytest.raises(ValueError, match="the checkpoint stores none: give --cfg_scale too"):
        build_sampling(plain, cfg_schedule="power_cosine")


def test_a_method_that_cannot_generate_reconstructs_in_one_step():
    torch.manual_seed(0)
    sampling = build_sampling(MAE(backbone=create_backbone("mae_nano")), sampler="ddim", steps=5)
    assert sampling.description == ONE_STEP and sampling.guidance is None


def test_evaluate_records_the_checkpoints_sampler_in_samples_json(umd_ckpt, tmp_path, capsys):
    common = ["evaluate", "--ckpt", str(umd_ckpt), "--num_samples", "2", "--batch_size", "2", "--fid", "false",
              "--isc", "false", "--prc", "false", "--device", "cpu"]
    main([*common, "--out", str(tmp_path / "default")])
    assert "ddim-125 (η 1.0), no guidance" in sample_line(capsys)
    record = json.loads((tmp_path / "default" / "samples.json").read_text())
    assert (record["sampler"], record["steps"], record["eta"], record["sampler_source"]) == ("ddim", 125, 1.0, "checkpoint")
    assert record["cfg"]["source"] == "none"
    main([*common, "--steps", "2", "--out", str(tmp_path / "short")])
    record = json.loads((tmp_path / "short" / "samples.json").read_text())
    assert (record["sampler"], record["steps"], record["eta"], record["sampler_source"]) == ("ddim", 2, 1.0, "command line")
