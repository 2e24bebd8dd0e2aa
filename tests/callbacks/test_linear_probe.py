import lightning as L
import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.callbacks.linear_probe import OnlineLinearProbe
from maskdiff.data import DigitsDataModule
from maskdiff.methods import DiT
from tests.helpers import single_thread

STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


class GradientRecorder(L.Callback):
    """Copies of the backbone's gradients at every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in pl_module.backbone.named_parameters() if p.grad is not None})


def short_fit(tmp_path, probe: OnlineLinearProbe | None):
    """``STEPS`` steps of a 2-block DiT on digits, validating (2 batches) every 2 steps; returns (method, trainer, recorder)."""
    L.seed_everything(0)
    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    method = DiT(backbone=backbone, ema_decay=0.9)
    recorder = GradientRecorder()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[recorder] + ([probe] if probe else []),
    )
    trainer.fit(method, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    return method, trainer, recorder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_cache):
    tmp_path = tmp_path_factory.mktemp("online_probe")
    with single_thread():
        plain = short_fit(tmp_path / "plain", None)
        probe = OnlineLinearProbe(lr=0.1)
        probed = short_fit(tmp_path / "probed", probe)
    return plain, probed, probe


def test_online_probe_leaves_training_untouched(runs):
    (plain, _, plain_grads), (probed, _, probed_grads), _ = runs
    assert len(plain_grads.steps) == len(probed_grads.steps) == STEPS
    for without, with_probe in zip(plain_grads.steps, probed_grads.steps):
        assert without.keys() == with_probe.keys()
        for name in without:
            assert torch.equal(without[name], with_probe[name]), name
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):  # backbone and EMA
        assert torch.equal(a, b)
    plain_state = plain.trainer.optimizers[0].state_dict()["state"]
    probed_state = probed.trainer.optimizers[0].state_dict()["state"]
    for key in plain_state:
        assert torch.equal(plain_state[key]["exp_avg"], probed_state[key]["exp_avg"])


def test_online_probe_logs_accuracy_and_protocol(runs):
    _, (_, trainer, _), probe = runs
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["probe/top1"]) <= float(metrics["probe/top5"]) <= 1.0
    assert torch.isfinite(metrics["probe/train_loss"])
    assert probe.protocol()["mode"] == "online" and probe.protocol()["pooling"] == "mean"
    assert probe.protocol()["timestep"] == 0 and probe.num_classes == 10


def test_online_probe_state_round_trip(runs):
    _, _, probe = runs
    state = probe.state_dict()
    restored = OnlineLinearProbe(lr=0.1, num_classes=10)
    restored.load_state_dict(state)
    restored.top1, restored.top5 = probe.top1.clone(), probe.top5.clone()
    head = restored._ensure_head(32, torch.device("cpu"))
    for a, b in zip(head.state_dict().values(), probe.head.state_dict().values()):
        assert torch.equal(a, b)
    assert restored.optimizer.state_dict()["state"].keys() == probe.optimizer.state_dict()["state"].keys()
    assert probe.state_key == "OnlineLinearProbe{'pooling': None, 'depth': None, 'timestep': None}"


def test_online_probe_needs_labels_and_classes():
    with pytest.raises(ValueError, match="no labels"):
        OnlineLinearProbe._split(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        OnlineLinearProbe(every_n_steps=0)


def test_online_probe_of_a_diffmae_method_reads_the_clean_unmasked_encoder(tmp_path, digits_cache):
    from maskdiff.backbones import DiffMAE as DiffMAEBackbone
    from maskdiff.methods import DiffMAE

    L.seed_everything(0)
    backbone = DiffMAEBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                               decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)
    method = DiffMAE(backbone=backbone)
    probe = OnlineLinearProbe(lr=0.1)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[probe],
    )
    datamodule = DigitsDataModule(image_size=8, batch_size=32)
    trainer.fit(method, datamodule=datamodule)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["probe/top1"]) <= float(metrics["probe/top5"]) <= 1.0
    assert torch.isfinite(metrics["probe/train_loss"])
    assert probe.protocol()["pooling"] == "cls" and probe.protocol()["timestep"] is None  # DiffMAE's encoder: no t

    images = next(iter(datamodule.val_dataloader()))[0][:4]
    method.backbone.eval()
    with torch.no_grad():
        expected = method.backbone.forward_features(method.batch_tokens(images))[:, 0]
    method.backbone.train()
    torch.testing.assert_close(probe.features(trainer, method, images), expected)
    assert method.backbone.training  # the probe restores the train mode
