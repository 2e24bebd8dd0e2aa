"""``maskdiff evaluate``: world-size-independent sampling, the ADM npz layout, the sidecar, and scoring references."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from maskdiff.methods.checkpoints import load_method
from maskdiff.tools.main import main
from maskdiff.evaluation.evaluate import (
    balanced_labels,
    batch_ranges,
    generate_samples,
    launch_shape,
    preview_selection,
)
from maskdiff.evaluation.inception import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_URL,
    to_inception_uint8,
)
from maskdiff.evaluation.scoring import load_samples_npz, write_samples_npz
from maskdiff.samplers import ClassifierFreeGuidance, DDIMSampler, DDPMSampler
from maskdiff.tools.evaluate import evaluate
from tests.evaluation.test_inception import write_small_inception_weights
from tests.helpers import ROOT


@pytest.fixture(scope="session")
def small_inception_weights(tmp_path_factory):
    """The seeded random Inception weights of test_inception (written once per session, shared)."""
    return write_small_inception_weights(tmp_path_factory.getbasetemp() / "small-inception" / INCEPTION_WEIGHTS_NAME)


def test_balanced_labels_cover_every_class_equally_in_a_seeded_order():
    labels = balanced_labels(103, 10, seed=0)
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    assert torch.equal(labels, balanced_labels(103, 10, seed=0))
    assert not torch.equal(labels, balanced_labels(103, 10, seed=1))
    assert not torch.equal(labels, torch.arange(103) % 10)  # shuffled: any prefix is roughly balanced


def test_ranks_take_contiguous_runs_of_the_fixed_batch_grid():
    grid = batch_ranges(10, 3)
    assert grid == [(0, 3), (3, 6), (6, 9), (9, 10)]
    for world_size in (2, 3, 4):
        parts = [batch_ranges(10, 3, rank, world_size) for rank in range(world_size)]
        assert [r for part in parts for r in part] == grid and all(parts)
    with pytest.raises(ValueError, match="world_size=5"):
        batch_ranges(10, 3, 0, 5)


def sample_all(module, world_size: int, **kwargs) -> torch.Tensor:
    """Concatenate every simulated rank's share of one sampling run."""
    return torch.cat([images for rank in range(world_size)
                      for _, images, _ in generate_samples(module, rank=rank, world_size=world_size, **kwargs)])


def test_samples_do_not_depend_on_the_world_size(dit_ckpt, one_thread):
    module = load_method(dit_ckpt).eval()
    settings = {"num_samples": 7, "seed": 3, "sampler": DDPMSampler(3), "guidance": ClassifierFreeGuidance(2.0),
                "batch_size": 2}
    single = sample_all(module, 1, **settings)
    assert single.shape == (7, 1, 8, 8)
    assert torch.equal(sample_all(module, 2, **settings), single)
    assert torch.equal(sample_all(module, 3, **settings), single)
    # Noise is per sample, so even another batch grid gives the same images (up to float rounding).
    assert torch.allclose(sample_all(module, 1, **{**settings, "batch_size": 3}), single, atol=1e-4)
    assert not torch.allclose(sample_all(module, 1, **{**settings, "seed": 4}), single, atol=1e-2)


def test_evaluate_writes_the_adm_npz_a_preview_and_a_complete_sidecar(dit_ckpt, tmp_path, capsys, one_thread):
    out = tmp_path / "eval"
    main(["evaluate", "--ckpt", str(dit_ckpt), "--out", str(out), "--num_samples", "6", "--sampler", "ddim",
          "--steps", "3", "--eta", "0.5", "--cfg_scale", "2.0", "--cfg_channels", "1", "--seed", "5",
          "--batch_size", "4", "--fid", "false", "--isc", "false", "--prc", "false", "--device", "cpu",
          "--progress", "true"])
    printed = capsys.readouterr()
    assert "wrote" in printed.out and "sampling: 100%" in printed.err and "6/6" in printed.err
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)  # NHWC, grayscale repeated to RGB
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
    assert torch.equal(torch.from_numpy(labels), balanced_labels(6, 10, seed=5))

    module = load_method(dit_ckpt).eval()
    expected = sample_all(module, 1, num_samples=6, seed=5, sampler=DDIMSampler(3, 0.5),
                          guidance=ClassifierFreeGuidance(2.0, 1), batch_size=4)
    assert np.array_equal(images, to_inception_uint8(expected).permute(0, 2, 3, 1).numpy())
    # 6 samples of 6 different classes: one upscaled 8x8 sample per class row, rows sorted by class.
    indices, per_row, row_labels = preview_selection(labels, 6)
    assert per_row == 1 and row_labels == sorted(row_labels, key=int) and len(row_labels) == 6
    assert np.array_equal(labels[indices], np.array(row_labels, dtype=np.int64))
    with Image.open(out / "preview.png") as preview:
        assert preview.height == 6 * (64 + 1) + 1 and preview.width > 64 + 2  # + the row labels' margin

    record = json.loads((out / "samples.json").read_text())
    assert record["checkpoint"] == str(dit_ckpt.resolve())
    assert record["checkpoint_sha256"] == hashlib.sha256(dit_ckpt.read_bytes()).hexdigest()[:16]
    assert record["method"].endswith(".DiT")
    assert (record["weights"], record["weights_requested"]) == ("ema", "ema")
    assert record["cfg"] == {"scale": 2.0, "channels": 1, "schedule": "constant", "power": None, "source": "command line"}
    assert (record["sampler"], record["steps"], record["eta"], record["ddpm_variance"]) == ("ddim", 3, 0.5, None)
    assert (record["seed"], record["num_samples"], record["clip_x0"]) == (5, 6, 1.0)
    assert record["class_order"]["num_classes"] == 10 and sum(record["class_order"]["counts"]) == 6
    assert "randperm" in record["class_order"]["rule"] and "manual_seed" in record["noise"]
    assert record["image_size"] == [8, 8, 3] and record["generated_channels"] == 1 and record["grayscale_repeated"]
    assert record["autoencoder"] == "pixels"
    assert (record["batch_size"], record["world_size"], record["device"]) == (4, 1, "cpu")
    assert record["preview"] == "preview.png"
    assert {"maskdiff", "torch", "torch_fidelity", "torchmetrics", "lightning"} <= set(record["versions"])
    assert all(record["versions"][name] for name in ("maskdiff", "torch", "torch_fidelity"))
    assert datetime.fromisoformat(record["date"]).tzinfo is not None
    assert not (out / "metrics.json").exists()


def test_missing_inception_weights_fail_before_sampling(dit_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_URL.replace(".", r"\.")):
        evaluate(ckpt=str(dit_ckpt), out=str(tmp_path / "eval"), num_samples=4, steps=2, reference=str(tmp_path))
    assert not (tmp_path / "eval").exists()


def test_evaluate_rejects_ambiguous_or_incomplete_requests(dit_ckpt, tmp_path, small_inception_weights):
    with pytest.raises(ValueError, match="exactly one of --ckpt"):
        evaluate(ckpt=str(dit_ckpt), samples=str(tmp_path / "x.npz"))
    with pytest.raises(ValueError, match="need --reference"):
        evaluate(ckpt=str(dit_ckpt), fid=True, reference=None)
    with pytest.raises(ValueError, match=r"arr_0 must be uint8 \(N, H, W, 3\)"):
        np.savez(tmp_path / "gray.npz", np.zeros((2, 8, 8), np.uint8))
        evaluate(samples=str(tmp_path / "gray.npz"), fid=False, isc=False, prc=False)
    with pytest.raises(ValueError, match="not an existing folder"):
        evaluate(samples=str(tmp_path / "gray.npz"), reference=str(tmp_path / "missing-folder"), isc=False, prc=False,
                 inception_weights=str(small_inception_weights))


def digits_nhwc(start: int, count: int, size: int = 16) -> np.ndarray:
    """Held-out real digits as uint8 ``(count, size, size, 3)``."""
    from maskdiff.evaluation.digits_judge import load_digits_split

    images, _ = load_digits_split("val")
    resized = F.interpolate(images[start : start + count], size=size, mode="bilinear", align_corners=False)
    return to_inception_uint8(resized).permute(0, 2, 3, 1).numpy()


def write_reference_shards(folder, images: np.ndarray) -> str:
    from maskdiff.data import write_manifest, write_shards

    samples = []
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        samples.append({"__key__": f"{index:04d}", "png": buffer.getvalue(), "cls": index % 10})
    shards = write_shards(samples, str(folder / "ref-%06d.tar"), max_samples=4, progress=False)
    write_manifest(folder / "manifest.json", {"shards": [{"path": os.path.basename(s["path"]), "samples": s["samples"]}
                                                         for s in shards]})
    return str(folder / "ref-{000000..000001}.tar")


def test_scores_agree_across_npz_statistics_folder_and_shard_references(small_inception_weights, tmp_path, monkeypatch,
                                                                        capsys, one_thread):
    """The same 6 reference digits as ADM-style mu/sigma (+ arr_0), as a PNG folder and as shards give one score
    to 3 digits + 3 noise images."""
    from torch_fidelity.utils import create_feature_extractor

    monkeypatch.setenv("MASKDIFF_CACHE", str(tmp_path / "cache"))
    noise = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    samples_path = write_samples_npz(tmp_path / "run" / "samples.npz", np.concatenate([digits_nhwc(100, 3), noise]))
    reference = digits_nhwc(0, 6)
    folder = tmp_path / "reference-png"
    folder.mkdir()
    for index, image in enumerate(reference):
        Image.fromarray(image).save(folder / f"{index}.png")
    extractor = create_feature_extractor("inception-v3-compat", ["64"], cuda=False, verbose=False,
                                         feature_extractor_weights_path=str(small_inception_weights))
    with torch.no_grad():
        features = extractor(torch.from_numpy(reference).permute(0, 3, 1, 2).contiguous())[0].double().numpy()
    statistics = tmp_path / "VIRTUAL_reference.npz"
    np.savez(statistics, mu=features.mean(0), sigma=np.cov(features, rowvar=False), arr_0=reference)
    shard_folder = tmp_path / "shards"
    shards = write_reference_shards(shard_folder, reference)

    scores = {}
    for name, ref in (("npz", statistics), ("folder", folder), ("shards", shards), ("shards-cached", shards)):
        scores[name] = evaluate(samples=str(samples_path), reference=str(ref), fid_layer="64", isc_splits=2,
                                inception_weights=str(small_inception_weights), batch_size=6, device="cpu",
                                overwrite=name != "npz",  # each scoring replaces metrics.json
                                progress=name == "shards")
    assert set(scores["npz"]) == {"fid", "is", "is_std", "precision", "recall", "f_score"}
    assert scores["npz"]["fid"] > 0 and scores["npz"]["precision"] < 1  # the noise images lie off the digits
    for name in ("folder", "shards"):
        assert scores[name]["fid"] == pytest.approx(scores["npz"]["fid"], rel=1e-4)
        for metric in ("is", "is_std", "precision", "recall"):
            assert scores[name][metric] == pytest.approx(scores["npz"][metric], rel=1e-6)
    assert scores["shards-cached"] == scores["shards"]
    assert len(list((tmp_path / "cache" / "fid_reference").glob("*.npz"))) == 1

    captured = capsys.readouterr()
    assert "reference statistics: 100%" in captured.err and "Processing samples" in captured.err  # the shards' bars
    printed = captured.out.splitlines()
    assert f"fid {scores['shards']['fid']:.6g}" in printed and any(line.startswith("recall ") for line in printed)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["metrics"] == scores["shards-cached"] and record["reference_kind"] == "shards"
    assert record["fid_layer"] == "64" and record["num_samples"] == 6
    assert record["inception_weights"]["sha256"] == hashlib.sha256(small_inception_weights.read_bytes()).hexdigest()
    assert load_samples_npz(samples_path).shape == (6, 16, 16, 3)


def test_preview_shows_one_full_row_per_class_for_the_first_ten_classes():
    labels = np.array([3, 1, 12, 1, 0, 3, 2, 9, 4, 5, 6, 7, 8, 0, 2, 1, 3, 11, 10, 4] * 3)
    indices, per_row, row_labels = preview_selection(labels, len(labels))
    assert row_labels == [str(label) for label in range(10)] and per_row == 3  # class 5..9 appear 3 times each
    assert len(indices) == 30 and (labels[indices] == np.repeat(np.arange(10), 3)).all()
    assert (indices[:3] == np.flatnonzero(labels == 0)[:3]).all()  # the first samples of each class, in order
    indices, per_row, row_labels = preview_selection(np.arange(300) % 10, 300)
    assert (per_row, row_labels, len(indices)) == (10, [str(label) for label in range(10)], 100)
    indices, per_row, row_labels = preview_selection(None, 250)
    assert (per_row, row_labels) == (10, None) and (indices == np.arange(100)).all()
    indices, per_row, _ = preview_selection(None, 7)
    assert per_row == 7 and len(indices) == 7


def test_launch_shape_reads_the_launcher_like_lightning(monkeypatch):
    for name in [name for name in os.environ if name.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(name)
    for name in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launch_shape() == (1, 1)
    slurm = {"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NAME": "eval",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert launch_shape() == (4, 2)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning ignores SLURM here; one process
    assert launch_shape() == (1, 1)
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "3", "RANK": "4", "LOCAL_RANK": "1",
                "GROUP_RANK": "1"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_JOB_NAME", "eval")  # torchrun inside a SLURM job: torchrun's ranks win, as in Fabric
    assert launch_shape() == (3, 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_on_two_processes_writes_the_single_process_outputs(dit_ckpt, tmp_path, one_thread):
    """One process in this test and two CPU processes under torchrun (Fabric, gloo; no MASTER_ADDR exported, no
    SLURM variable) write bit-identical samples, preview and sidecar but for world_size and date. 6 samples in
    batches of 2 give the ranks 2 and 4 samples: the gather pads rank 0's share."""
    common = ["evaluate", "--ckpt", str(dit_ckpt), "--num_samples", "6", "--sampler", "ddpm", "--steps", "3",
              "--batch_size", "2", "--fid", "false", "--isc", "false", "--prc", "false", "--device", "cpu"]
    main([*common, "--out", str(tmp_path / "single")])
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SLURM_", "MASTER_", "TORCHELASTIC_")) and name not in ("WORLD_SIZE", "RANK",
                                                                                      "LOCAL_RANK")}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "maskdiff.tools.main", *common, "--out", str(tmp_path / "torchrun")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    single, split = tmp_path / "single", tmp_path / "torchrun"
    with np.load(single / "samples.npz") as one, np.load(split / "samples.npz") as two:
        assert sorted(one.files) == sorted(two.files) == ["arr_0", "arr_1"]
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert (single / "preview.png").read_bytes() == (split / "preview.png").read_bytes()
    records = [json.loads((folder / "samples.json").read_text()) for folder in (single, split)]
    assert (records[0]["world_size"], records[1]["world_size"]) == (1, 2)
    assert [{k: v for k, v in record.items() if k not in ("world_size", "date")} for record in records] == \
        [{k: v for k, v in records[0].items() if k not in ("world_size", "date")}] * 2
    assert sorted(os.listdir(split)) == ["preview.png", "samples.json", "samples.npz"]
    assert result.stdout.count("wrote ") == 1  # rank 0 alone writes
