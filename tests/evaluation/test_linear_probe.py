import json

import lightning as L
import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.backbones import create_backbone
from maskdiff.tools.main import main
from maskdiff.backbones.features import FeatureSpec
from maskdiff.evaluation.features import extract_dataset_features, extract_features
from maskdiff.evaluation.lars import LARS
from maskdiff.evaluation.linear_probe import run_linear_probe
from maskdiff.tools import probe as probe_tool
from maskdiff.tools.probe import probe
from tests.helpers import DEBUG_CONFIG

PROTOCOL_FIELDS = {"mode", "ckpt", "weights", "pooling", "depth", "timestep", "epochs", "warmup_epochs", "batch",
                   "base_lr", "lr", "optimizer", "weight_decay", "seed", "num_train", "num_val", "num_classes",
                   "feature_dim", "top1", "top5"}
QUICK = ["--batch_size", "256", "--epochs", "4", "--warmup_epochs", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def separable(num: int, generator: torch.Generator, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, means.shape[0], (num,), generator=generator)
    return means[labels] + torch.randn(num, means.shape[1], generator=generator), labels


# ---------------------------------------------------------------------------------------------- LARS
def test_lars_update_is_mae_formula():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    bias = torch.tensor([0.3, -0.1], requires_grad=True)
    lr, wd, momentum, trust = 0.5, 0.1, 0.9, 0.001
    optimizer = LARS([weight, bias], lr=lr, weight_decay=wd, momentum=momentum, trust_coefficient=trust)
    grads = [(torch.tensor([[0.2, 0.1], [-0.3, 0.4]]), torch.tensor([1.0, -2.0])),
             (torch.tensor([[-0.1, 0.5], [0.2, 0.0]]), torch.tensor([0.5, 0.5]))]
    w, b, mu_w, mu_b = weight.detach().clone(), bias.detach().clone(), torch.zeros(2, 2), torch.zeros(2)
    for grad_w, grad_b in grads:
        weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
        optimizer.step()
        update = grad_w + wd * w
        mu_w = momentum * mu_w + update * (trust * w.norm() / update.norm())
        mu_b = momentum * mu_b + grad_b  # 1-D: no weight decay, no trust scaling
        w, b = w - lr * mu_w, b - lr * mu_b
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)

    zero = torch.zeros(2, 2, requires_grad=True)  # ||p|| = 0: q = 1, the decayed gradient is applied unscaled
    zero.grad = torch.full((2, 2), 2.0)
    LARS([zero], lr=lr, weight_decay=wd).step()
    torch.testing.assert_close(zero.detach(), torch.full((2, 2), -lr * 2.0))


# ---------------------------------------------------------------------------------------------- offline head
def test_offline_probe_separates_linear_classes_deterministically():
    generator = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(10, 32, generator=generator)
    train, val = separable(2000, generator, means), separable(500, generator, means)
    result = run_linear_probe(*train, *val, epochs=30, warmup_epochs=5, batch_size=256)
    assert result["top1"] >= 0.98 and result["top5"] >= result["top1"]
    assert result["lr"] == pytest.approx(0.1) and result["batch"] == 256 and result["optimizer"] == "lars"
    assert (result["num_train"], result["num_val"], result["feature_dim"], result["num_classes"]) == (2000, 500, 32, 10)
    assert run_linear_probe(*train, *val, epochs=30, warmup_epochs=5, batch_size=256) == result
    assert run_linear_probe(*train, *val, epochs=30, warmup_epochs=5, batch_size=256, seed=1)["train_loss"] != result["train_loss"]


def test_offline_probe_rejects_unlabelled_features():
    features = torch.randn(8, 4)
    with pytest.raises(ValueError, match="unlabelled"):
        run_linear_probe(features, torch.full((8,), -1), features, torch.zeros(8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- features
def test_feature_pooling_depth_and_timestep_rules(caplog):
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    dit = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    mean = extract_features(dit, images, FeatureSpec(pooling="mean", timestep=5, use_ema=False))
    tokens = dit.patchifier.patchify(images)
    torch.testing.assert_close(mean, dit.forward_features(tokens, t=torch.full((3,), 5)).mean(1))
    with caplog.at_level("WARNING", logger="maskdiff.evaluation"):
        extract_features(dit, images, FeatureSpec(pooling="mean"))
    assert "probing at timestep 0" in caplog.text
    with pytest.raises(ValueError, match="pooling 'cls' needs a cls/prefix token.*num_prefix_tokens=0.*'mean'"):
        extract_features(dit, images, FeatureSpec(pooling="cls"))
    with pytest.raises(ValueError, match=r"depth 3 is out of range; DiT has encoder blocks 0\.\.2"):
        extract_features(dit, images, FeatureSpec(pooling="mean", depth=3))
    with pytest.raises(ValueError, match="unknown pooling 'max'; expected one of cls, mean"):
        FeatureSpec(pooling="max")

    mae = create_backbone("mae_nano").train()
    cls = extract_features(mae, images, FeatureSpec(pooling="cls", depth=1))
    assert cls.shape == (3, 32) and mae.training
    torch.testing.assert_close(cls, mae.eval().forward_features(tokens, depth=1)[:, 0])
    with pytest.raises(ValueError, match="timestep 0 was given, but MAE is not conditioned on timesteps"):
        extract_features(mae, images, FeatureSpec(pooling="cls", timestep=0))


def test_feature_extraction_and_head_training_show_bars_only_when_asked(capsys, monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "MASKDIFF_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    mae = create_backbone("mae_nano")
    batches = [(torch.rand(2, 1, 8, 8), torch.tensor([0, 1])) for _ in range(3)]
    spec = FeatureSpec(pooling="cls")
    features, labels = extract_dataset_features(mae, batches, spec, max_batches=2, desc="features (train)")
    assert features.shape == (4, 32) and labels.tolist() == [0, 1, 0, 1]
    run_linear_probe(features, labels, features, labels, epochs=2, warmup_epochs=0, batch_size=4)
    assert capsys.readouterr().err == ""  # stderr is no terminal under pytest: no bars, so CI logs stay clean
    monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
    extract_dataset_features(mae, batches, spec, max_batches=2, desc="features (train)")
    run_linear_probe(features, labels, features, labels, epochs=3, warmup_epochs=0, batch_size=4)
    bars = capsys.readouterr().err
    assert "features (train)" in bars and "2/2" in bars and "probe head" in bars and "3/3" in bars and "loss=" in bars
    extract_dataset_features(mae, batches, spec, progress=False)
    run_linear_probe(features, labels, features, labels, epochs=2, warmup_epochs=0, batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- maskdiff probe
def test_probe_cli_end_to_end_and_feature_cache(dit_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
    monkeypatch.delenv("RANK", raising=False)
    out, cache = tmp_path / "probe.json", tmp_path / "cache"
    main(["probe", "--ckpt", str(dit_ckpt), "--data", str(DEBUG_CONFIG), "--out", str(out), "--cache_dir", str(cache), *QUICK])
    result = json.loads(out.read_text())
    assert PROTOCOL_FIELDS <= set(result)
    assert result["mode"] == "offline" and result["pooling"] == "mean" and result["timestep"] == 0
    assert result["weights"] == "ema" and result["depth"] is None and result["feature_dim"] == 32
    assert (result["num_train"], result["num_val"]) == (1497, 300)  # every digit of each split exactly once
    assert isinstance(result["top1"], float) and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    printed = capsys.readouterr()
    assert "top1" in printed.out and "cached in" in printed.err
    assert all(bar in printed.err for bar in ("features (train)", "features (val)", "probe head"))
    assert len(list(cache.glob("*.pt"))) == 1

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(probe_tool, "extract_dataset_features", no_extraction)
    main(["probe", "--ckpt", str(dit_ckpt), "--data.class_path", "maskdiff.data.DigitsDataModule",
          "--data.init_args.image_size", "8", "--out", str(out), "--cache_dir", str(cache), *QUICK, "--progress", "false"])
    reused = capsys.readouterr().err
    assert "reusing" in reused and "probe head" not in reused
    assert json.loads(out.read_text())["top1"] == result["top1"]


def test_probe_bad_input_is_named(dit_ckpt, tmp_path, capsys):
    common = ["--ckpt", str(dit_ckpt), "--data", str(DEBUG_CONFIG), "--cache_dir", str(tmp_path), "--out", str(tmp_path / "p.json")]
    with pytest.raises(SystemExit):
        main(["probe", *common, "--pooling", "max"])
    error = capsys.readouterr().err
    assert "max" in error and "'cls', 'mean'" in error
    with pytest.raises(ValueError, match="pooling 'cls' needs a cls/prefix token"):
        main(["probe", *common, "--pooling", "cls"])
    with pytest.raises(ValueError, match=r"depth 7 is out of range; DiT has encoder blocks 0\.\.2"):
        main(["probe", *common, "--depth", "7"])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        main(["probe", "--ckpt", str(tmp_path / "nope.ckpt"), "--data", str(DEBUG_CONFIG)])


class ImagesOnly(L.LightningDataModule):
    def __init__(self, labels: int | None):
        super().__init__()
        images = torch.rand(8, 1, 8, 8) * 2 - 1
        self.batches = [images] if labels is None else [(images, torch.full((8,), labels))]

    def train_dataloader(self):
        return self.batches

    def val_dataloader(self):
        return self.batches


@pytest.mark.parametrize("labels, message", [(None, "gives no labels"), (-1, "unlabelled .*all 8 labels are -1")])
def test_probe_refuses_data_without_labels(dit_ckpt, tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        probe(str(dit_ckpt), ImagesOnly(labels), cache_dir=str(tmp_path), out=str(tmp_path / "p.json"), epochs=1, warmup_epochs=0)


def test_few_shot_probe_separates_classes_and_not_noise():
    from maskdiff.evaluation.linear_probe import few_shot_probe

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 4
    labels = torch.arange(3).repeat_interleave(20)
    features = centres[labels] + torch.randn(60, 8, generator=generator)
    assert few_shot_probe(features, labels, features, labels, shots=5, l2_reg=1.0) > 0.95
    noise = torch.randn(60, 8, generator=generator)
    assert few_shot_probe(noise, labels, noise[:30], labels[:30], shots=5, l2_reg=1.0) < 0.8
