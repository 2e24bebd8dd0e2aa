"""``compile_backbone``: the backbone only, keys unchanged, no recompilation after the first step, eager losses."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from maskdiff.backbones import create_backbone
from maskdiff.corruption import GaussianNoise, MaskedNoise
from maskdiff.methods import MAE, MDT, UMD, DiffMAE, DiT, MaskDiffModule
from maskdiff.objectives import DiffusionLoss
from maskdiff.scale import compile_blocks, compile_in_place, is_compiled

TINY = dict(input_size=8, in_channels=1)


def tiny(method: str) -> MaskDiffModule:
    torch.manual_seed(0)
    if method == "dit":
        return DiT(create_backbone("DiT-Nano/2", **TINY, num_classes=10), ema_decay=0.9)
    if method == "mdt":
        return MDT(create_backbone("MDT-Nano/2", **TINY, num_classes=10), ema_decay=None)
    if method == "mdtv2":  # a mask ratio drawn per batch: the kept-token count changes every step
        backbone = create_backbone("MDTv2-S/2", **TINY, num_classes=10, hidden_size=32, num_heads=2, depth=4, decode_layer=2)
        return MDT(backbone, corruption=MaskedNoise(0.3, 0.5), ema_decay=None)
    if method == "mae":
        return MAE(create_backbone("mae_nano"))
    if method == "diffmae":
        return DiffMAE(create_backbone("diffmae_nano"))
    return UMD(create_backbone("UMD-Nano/2", **TINY, num_classes=10), ema_decay=None)


class RecordLosses(L.Callback):
    """Keep every training loss; make any recompilation after the first step an error."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 1:
            torch._dynamo.config.error_on_recompile = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_steps(module: MaskDiffModule, steps: int = 4) -> list[float]:
    images = torch.rand(8 * steps, 1, 8, 8) * 2 - 1
    labels = torch.arange(8 * steps) % 10
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, drop_last=True)
    recorder = RecordLosses()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        torch._dynamo.config.error_on_recompile = False
    return recorder.losses




@pytest.mark.parametrize(("method", "dynamic"), [
    ("dit", None), ("mae", None),
    pytest.param("mdt", None, marks=pytest.mark.slow), pytest.param("mdtv2", True, marks=pytest.mark.slow),
    pytest.param("diffmae", None, marks=pytest.mark.slow), pytest.param("umd", None, marks=pytest.mark.slow),
])
def test_compiled_backbone_trains_without_recompiling_and_matches_eager(method, dynamic, one_thread):
    eager_losses = train_steps(tiny(method))
    torch._dynamo.reset()
    compiled = tiny(method)
    compiled.compile_backbone, compiled.compile_kwargs = True, {"backend": "eager", "dynamic": dynamic}
    keys = list(compiled.state_dict())
    compiled_losses = train_steps(compiled)
    assert is_compiled(compiled.backbone)
    assert compiled.ema_backbone is None or not is_compiled(compiled.ema_backbone)
    assert list(compiled.state_dict()) == keys  # no _orig_mod. prefix
    assert len(compiled_losses) == 4
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)


def test_aot_autograd_backend_gives_the_eager_gradients(one_thread):
    torch._dynamo.reset()
    eager = tiny("dit").backbone
    compiled = compile_in_place(tiny("dit").backbone, backend="aot_eager")
    tokens, t, y = torch.randn(4, 16, 4), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    eager.y_embedder.dropout_prob = compiled.y_embedder.dropout_prob = 0.0
    for model in (eager, compiled):
        model(tokens, t, y).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_flag_is_an_init_argument_and_tools_without_a_trainer_stay_eager():
    module = MaskDiffModule(create_backbone("DiT-Nano/2", **TINY, num_classes=10), GaussianNoise(),
                            DiffusionLoss(learn_sigma=True), compile_backbone=True, compile_kwargs={"mode": "reduce-overhead"})
    module.configure_model()  # no trainer: load_from_checkpoint and the tools call nothing, and must stay eager
    assert not is_compiled(module.backbone)
    assert module.hparams["compile_backbone"] is True


def test_unknown_compile_option_is_named():
    with pytest.raises(ValueError, match="unknown torch.compile option.*'modes'"):
        MaskDiffModule(create_backbone("DiT-Nano/2", **TINY), GaussianNoise(), DiffusionLoss(learn_sigma=True),
                       compile_backbone=True, compile_kwargs={"modes": "max-autotune"})


def test_regional_compilation_compiles_each_block_once_and_identical_blocks_share_a_graph(one_thread):
    """``compile_blocks``: every block compiled in place (state-dict keys kept, the EMA copy and the code between
    blocks left eager); the two identical DiT blocks run one compiled graph; gradients are the eager ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, regional = tiny("dit"), tiny("dit")
    keys = list(regional.state_dict())
    assert compile_blocks(regional.backbone, backend="aot_eager") == len(regional.backbone.blocks) == 2
    assert compile_blocks(regional.backbone, backend="aot_eager") == 0  # already compiled
    assert all(is_compiled(block) for block in regional.backbone.blocks) and not is_compiled(regional.backbone)
    assert not any(is_compiled(block) for block in regional.ema_backbone.blocks)
    assert list(regional.state_dict()) == keys
    tokens, t, y = torch.randn(4, 16, 4), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 4])
    for model in (eager.backbone, regional.backbone):
        model.y_embedder.dropout_prob = 0.0
        model(tokens, t, y).square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 1
    for (name, p), q in zip(eager.backbone.named_parameters(), regional.backbone.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    no_blocks = type("NoBlocks", (torch.nn.Module,), {"block_classes": ()})()
    with pytest.raises(ValueError, match="NoBlocks declares no block_classes"):
        compile_blocks(no_blocks)
