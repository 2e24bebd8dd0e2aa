"""GenerativeMetrics: values from fixed samples and real validation images, out of checkpoints, equal under DDP.

The tests use the digits judge as the feature extractor (Inception weights cannot be downloaded here, and
Inception on a shared CPU is slow); the callback treats it exactly like Inception (uint8 RGB in, features out).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch

from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.callbacks import GenerativeMetrics
from maskdiff.data import DigitsDataModule
from maskdiff.evaluation.evaluate import generate_samples
from maskdiff.evaluation.frechet import feature_statistics, frechet_distance
from maskdiff.evaluation.inception import (
    INCEPTION_WEIGHTS_ENV,
    DigitsJudgeFeatures,
    to_inception_uint8,
)
from maskdiff.methods import DiT
from maskdiff.samplers import DDIMSampler
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def digits_method() -> DiT:
    L.seed_everything(0)
    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    return DiT(backbone=backbone, ema_decay=0.9, clip_x0=1.0)


def judge_metrics(**kwargs) -> GenerativeMetrics:
    settings = {"num_samples": 24, "feature": DigitsJudgeFeatures(), "inception_score": DigitsJudgeFeatures(logits=True),
                "sampler": DDIMSampler(3), "batch_size": 8, "seed": 1}
    return GenerativeMetrics(**{**settings, **kwargs})


def test_fit_logs_fid_and_is_of_the_fixed_samples_and_keeps_them_out_of_checkpoints(tmp_path, digits_cache):
    method, callback = digits_method(), judge_metrics(every_n_steps=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=[callback, L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    data = DigitsDataModule(image_size=8, batch_size=32)
    trainer.fit(method, datamodule=data)

    assert [entry["step"] for entry in callback.history] == [2, 3]  # every 2 steps, then at the end of training
    final = callback.history[-1]
    assert trainer.callback_metrics["eval/fid"].item() == pytest.approx(final["eval/fid"])

    # The same samples and the 300 validation digits, scored without the callback.
    judge = DigitsJudgeFeatures()
    fake = torch.cat([to_inception_uint8(images) for _, images, _ in
                      generate_samples(method, 24, seed=1, sampler=DDIMSampler(3), batch_size=8)])
    real = torch.cat([to_inception_uint8(images) for images, _ in data.val_dataloader()])
    assert len(real) == 300
    expected_fid = frechet_distance(*feature_statistics(judge(fake)), *feature_statistics(judge(real)))
    assert final["eval/fid"] == pytest.approx(expected_fid, rel=1e-6)
    assert callback.history[0]["eval/fid"] != final["eval/fid"]  # the weights changed between evaluations
    assert 1.0 < final["eval/is"] <= 10.0

    rows = list(csv.DictReader(next((tmp_path / "logs").rglob("metrics.csv")).open()))
    logged = [row for row in rows if row.get("eval/fid")]
    assert [int(row["step"]) for row in logged] == [2, 3] and all(row["eval/is_std"] for row in logged)

    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert set(checkpoint["state_dict"]) == set(method.state_dict())
    assert not any("judge" in key or "inception" in key for key in checkpoint["state_dict"])
    assert not any("GenerativeMetrics" in key for key in checkpoint.get("callbacks", {}))


def test_inception_score_over_one_split_is_the_exact_formula(tmp_path, digits_cache):
    method, callback = digits_method(), judge_metrics(isc_splits=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(method, datamodule=DigitsDataModule(image_size=8, batch_size=32))
    fake = torch.cat([to_inception_uint8(images) for _, images, _ in
                      generate_samples(method, 24, seed=1, sampler=DDIMSampler(3), batch_size=8)])
    probabilities = DigitsJudgeFeatures(logits=True)(fake).double().softmax(-1)
    marginal = probabilities.mean(0, keepdim=True)
    expected = (probabilities * (probabilities.log() - marginal.log())).sum(-1).mean().exp().item()
    assert callback.history[-1]["eval/is"] == pytest.approx(expected, rel=1e-5)


def test_inception_metrics_are_built_lazily_from_the_local_weights_file(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    callback = GenerativeMetrics(every_n_steps=100)  # no weights needed to configure a run
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        callback._metrics_on(torch.device("cpu"))
    with pytest.raises(ValueError, match="every_n_steps"):
        GenerativeMetrics(every_n_steps=-1)


DDP_SCRIPT = textwrap.dedent('''
    """One short fit with GenerativeMetrics (learning rate 0: every run samples from the same seeded weights)."""
    import json
    import sys

    import lightning as L
    import torch

    from maskdiff.backbones import DiT as DiTBackbone
    from maskdiff.callbacks import GenerativeMetrics
    from maskdiff.data import DigitsDataModule
    from maskdiff.evaluation.inception import DigitsJudgeFeatures
    from maskdiff.methods import DiT
    from maskdiff.samplers import DDIMSampler


    def frozen_adamw(params):
        return torch.optim.AdamW(params, lr=0.0)


    def run(devices: int, out: str) -> None:
        L.seed_everything(0)
        backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                               num_classes=10)
        method = DiT(backbone=backbone, ema_decay=0.9, clip_x0=1.0, optimizer=frozen_adamw)
        callback = GenerativeMetrics(
            every_n_steps=1, num_samples=50, feature=DigitsJudgeFeatures(),
            inception_score=DigitsJudgeFeatures(logits=True), sampler=DDIMSampler(3), batch_size=10, seed=1,
        )
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
            limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        )
        trainer.fit(method, datamodule=DigitsDataModule(image_size=8, batch_size=16))
        if trainer.global_rank == 0:
            with open(out, "w") as handle:
                json.dump({"history": callback.history, "world_size": trainer.world_size}, handle)


    if __name__ == "__main__":
        run(int(sys.argv[1]), sys.argv[2])
''')


@pytest.mark.slow
def test_two_process_ddp_gives_the_single_process_values(tmp_path, digits_cache):
    DigitsJudgeFeatures()  # train and cache the judge once, before two processes would both train it
    script = tmp_path / "generative_metrics_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"history-{devices}.json"
        done = subprocess.run([sys.executable, str(script), str(devices), str(out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        results[devices] = json.loads(out.read_text())
    assert results[2]["world_size"] == 2
    single, split = results[1]["history"], results[2]["history"]
    assert [entry["step"] for entry in split] == [entry["step"] for entry in single] == [1, 2]
    for one, two in zip(single, split):
        for name in ("eval/fid", "eval/is", "eval/is_std"):
            assert two[name] == pytest.approx(one[name], rel=1e-6), name
    assert single[0]["eval/fid"] > 0 and single[0]["eval/is"] > 1


def test_the_example_config_builds_the_callback_without_the_weights_file(tmp_path, monkeypatch):
    from maskdiff.tools.lightning_cli import MaskDiffCLI
    from tests.helpers import CONFIGS, DEBUG_CONFIG

    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cli = MaskDiffCLI(args=["--config", str(DEBUG_CONFIG), "--config", str(CONFIGS / "callbacks" / "generative_metrics.yaml"),
                            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, GenerativeMetrics)]
    assert (callback.every_n_steps, callback.num_samples, callback.feature) == (50000, 10000, 2048)
    assert isinstance(callback.sampler, DDIMSampler) and callback.sampler.steps == 50
    assert callback.guidance.scale == 1.5 and callback._fid is None  # Inception is only built at the first evaluation
