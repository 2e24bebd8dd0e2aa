"""`sample` and `evaluate` take a paper's sampling preset; command-line options still win; samples.json records it."""

import json

import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.methods import DiT
from maskdiff.methods.checkpoints import load_method, write_method_checkpoint
from maskdiff.samplers import DDIMSampler, DDPMSampler
from maskdiff.tools.main import main
from maskdiff.tools.sampling import build_sampling
from tests.tools.test_sampling import TINY_DIT

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    method = DiT(backbone=DiTBackbone(**TINY_DIT), ema_decay=None)
    init_args = {"backbone": {"class_path": "maskdiff.backbones.DiT", "init_args": TINY_DIT}, "ema_decay": None}
    path = tmp_path_factory.mktemp("dit") / "dit.ckpt"
    return write_method_checkpoint(path, "maskdiff.methods.DiT", init_args, method.state_dict())


def test_a_preset_replaces_the_checkpoints_settings_and_options_still_win(dit_ckpt):
    module = load_method(dit_ckpt)
    sampling = build_sampling(module, preset="mdt-xl2")
    assert isinstance(sampling.sampler, DDPMSampler) and sampling.sampler.steps == 250
    guidance = sampling.guidance
    assert (guidance.scale, guidance.channels, guidance.schedule, guidance.power) == (3.8, 3, "power_cosine", 4.0)
    assert sampling.record["sampler_source"] == sampling.record["cfg"]["source"] == "preset mdt-xl2"
    assert sampling.record["preset"]["name"] == "mdt-xl2" and sampling.record["preset"]["vae"] == "sd-vae-ft-ema"
    overridden = build_sampling(module, preset="umd-cfg4.0", steps=5, cfg_scale=2.0)
    assert isinstance(overridden.sampler, DDIMSampler) and (overridden.sampler.steps, overridden.sampler.eta) == (5, 1.0)
    assert overridden.guidance.scale == 2.0 and overridden.guidance.channels is None
    assert overridden.record["sampler_source"] == overridden.record["cfg"]["source"] == "command line"
    with pytest.raises(ValueError, match="unknown sampling preset 'dit'"):
        build_sampling(module, preset="dit")


def test_evaluate_writes_the_preset_to_samples_json(dit_ckpt, tmp_path, capsys):
    main(["evaluate", "--ckpt", str(dit_ckpt), "--num_samples", "2", "--batch_size", "2", "--fid", "false",
          "--isc", "false", "--prc", "false", "--device", "cpu", "--preset", "dit-xl2-cfg1.5", "--steps", "2",
          "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "samples.json").read_text())
    assert (record["sampler"], record["steps"]) == ("ddpm", 2)
    assert (record["cfg"]["scale"], record["cfg"]["channels"], record["cfg"]["source"]) == (1.5, 3, "preset dit-xl2-cfg1.5")
    assert record["preset"]["name"] == "dit-xl2-cfg1.5" and record["preset"]["num_samples"] == 50_000
    main(["sample", "--ckpt", str(dit_ckpt), "--out", str(tmp_path / "grid.png"), "--classes", "[1,2]",
          "--per_class", "1", "--preset", "dit-xl2-cfg4.0", "--steps", "2"])
    assert "cfg 4.0 (constant), preset dit-xl2-cfg4.0" in capsys.readouterr().out
