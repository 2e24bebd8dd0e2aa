"""UMD's linear-probe preset (``configs/umd/linear_probe.yaml``, big_vision's ``ae_i1k_lp``) and ``optax.lars``."""

import json

import pytest
import torch

from maskdiff.backbones import UMD as UMDBackbone
from maskdiff.evaluation import linear_probe
from maskdiff.evaluation.lars import LARS
from maskdiff.evaluation.linear_probe import warmup_cosine
from maskdiff.methods import UMD
from maskdiff.methods.checkpoints import write_method_checkpoint
from maskdiff.tools.main import main
from tests.helpers import ROOT

PRESET = ROOT / "configs" / "umd" / "linear_probe.yaml"
NANO = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, decoder_depth=1)
DIGITS = ["--data.class_path", "maskdiff.data.DigitsDataModule", "--data.init_args.image_size", "8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_lars_optax_flavour_is_the_optax_lars_update():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    bias = torch.tensor([0.3, -0.1], requires_grad=True)
    wd, momentum, trust = 0.1, 0.9, 0.001
    optimizer = LARS([weight, bias], lr=0.0, weight_decay=wd, momentum=momentum, trust_coefficient=trust, flavour="optax")
    steps = [(0.5, torch.tensor([[0.2, 0.1], [-0.3, 0.4]]), torch.tensor([1.0, -2.0])),
             (0.25, torch.tensor([[-0.1, 0.5], [0.2, 0.0]]), torch.tensor([0.5, 0.5]))]
    params, traces = [weight.detach().clone(), bias.detach().clone()], [torch.zeros(2, 2), torch.zeros(2)]
    for lr, grad_w, grad_b in steps:
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
        for i, grad in enumerate((grad_w, grad_b)):  # add_decayed_weights -> scale_by_trust_ratio -> scale(-lr) -> trace
            update = grad + wd * params[i]
            update = update * (trust * params[i].norm() / update.norm())
            traces[i] = -lr * update + momentum * traces[i]
            params[i] = params[i] + traces[i]
        torch.testing.assert_close(weight.detach(), params[0])
        torch.testing.assert_close(bias.detach(), params[1])  # biases are decayed and trust-scaled too
    with pytest.raises(ValueError, match="unknown LARS flavour 'adam'"):
        LARS([weight], flavour="adam")


def test_umd_preset_reaches_the_optimizer_and_the_head(tmp_path, monkeypatch, digits_cache):
    torch.manual_seed(0)
    module = UMD(backbone=UMDBackbone(**NANO), ema_decay=None)
    init_args = {"backbone": {"class_path": "maskdiff.backbones.UMD", "init_args": NANO}, "ema_decay": None}
    ckpt = write_method_checkpoint(tmp_path / "umd.ckpt", "maskdiff.methods.UMD", init_args, module.state_dict())

    heads, optimizers, lrs = [], [], []

    class RecordingLARS(LARS):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def recording_head(*args, **kwargs):
        heads.append(linear_head(*args, **kwargs))
        return heads[-1]

    linear_head = linear_probe.linear_head
    monkeypatch.setattr(linear_probe, "LARS", RecordingLARS)
    monkeypatch.setattr(linear_probe, "linear_head", recording_head)
    out = tmp_path / "probe.json"
    main(["probe", "--config", str(PRESET), "--ckpt", str(ckpt), *DIGITS, "--out", str(out), "--cache_dir", str(tmp_path)])

    (head,), (optimizer,) = heads, optimizers
    assert isinstance(head[0], torch.nn.BatchNorm1d) and head[0].eps == 1e-5 and not head[0].affine
    assert optimizer.flavour == "optax"
    assert {k: optimizer.defaults[k] for k in ("weight_decay", "momentum", "trust_coefficient")} == {
        "weight_decay": 5e-5, "momentum": 0.9, "trust_coefficient": 0.001}
    result = json.loads(out.read_text())
    assert {k: result[k] for k in ("pooling", "optimizer", "weight_decay", "epochs", "warmup_epochs", "base_lr", "bn_eps")} == {
        "pooling": "prefix_mean", "optimizer": "lars_optax", "weight_decay": 5e-5, "epochs": 100, "warmup_epochs": 5,
        "base_lr": 0.1, "bn_eps": 1e-5}
    batch = result["batch"]  # 4096, capped at the 1,497 training digits: one step per epoch
    assert (batch, result["steps"], len(lrs)) == (1497, 100, 100)
    peak = 0.1 * batch / 256
    assert result["lr"] == pytest.approx(peak)
    assert lrs == pytest.approx([warmup_cosine(epoch, peak, 5, 100) for epoch in range(100)])
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == 5

    main(["probe", "--config", str(PRESET), "--ckpt", str(ckpt), *DIGITS, "--out", str(out), "--cache_dir", str(tmp_path),
          "--epochs", "2", "--warmup_epochs", "0"])
    assert (json.loads(out.read_text())["epochs"], len(lrs)) == (2, 102)  # options after the preset win


def test_probe_help_names_the_preset(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    assert "configs/umd/linear_probe.yaml" in capsys.readouterr().out
