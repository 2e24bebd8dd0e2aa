import contextlib
import io
import os
import random
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from maskdiff.autoencoders import StableDiffusionVAE
from maskdiff.backbones import DiT as DiTBackbone
from maskdiff.tools.main import main
from maskdiff.data import (
    ImageShardsDataModule,
    LatentDecoder,
    LatentShardsDataModule,
    encode_latent_shards,
    read_manifest,
    write_manifest,
    write_shards,
)
from maskdiff.methods import DiT
from maskdiff.samplers import DDIMSampler

diffusers = pytest.importorskip("diffusers", reason="the latent extra (diffusers) is part of the test extra")

SCALE = 0.5
NUM_IMAGES = 10


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, layers_per_block=1, sample_size=16,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """10 RGB 16×16 images with labels 0..3 in two shards + manifest; returns (pattern, images (10, 16, 16, 3))."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_IMAGES, 16, 16, 3), dtype=np.uint8)
    samples = []
    for index, pixels in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        samples.append({"__key__": f"img{index:03d}", "png": buffer.getvalue(), "cls": index % 4})
    shards = write_shards(samples, str(root / "images-train-%06d.tar"), 6, progress=False)
    write_manifest(root / "manifest.json", {
        "classes": [0, 1, 2, 3],
        "splits": {"train": {"pattern": "images-train-{000000..000001}.tar", "samples": NUM_IMAGES,
                             "shards": [{"path": os.path.basename(s["path"]), "samples": s["samples"]} for s in shards]}},
    })
    return str(root / "images-train-{000000..000001}.tar"), images


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory, tiny_vae_dir, image_shards):
    """``(out, manifest, stderr)``: the image shards encoded once, with ``MASKDIFF_PROGRESS=1``."""
    out = tmp_path_factory.mktemp("latents")
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stderr(stderr):
        monkeypatch.setenv("MASKDIFF_PROGRESS", "1")
        monkeypatch.delenv("RANK", raising=False)
        manifest = encode_latent_shards(image_shards[0], out, str(tiny_vae_dir), scale_factor=SCALE, image_size=16,
                                        flip_copies=True, batch_size=4, device="cpu", samples_per_shard=4)
    return out, manifest, stderr.getvalue()


def reference_latents(vae_dir, images: np.ndarray) -> torch.Tensor:
    """The VAE posterior mean × scale of uint8 images ``(B, H, W, 3)``, straight from diffusers."""
    vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).eval()
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean * SCALE


def eval_batches(datamodule):
    batches = list(datamodule.val_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_writer_manifest_and_keys(latent_shards, tiny_vae_dir):
    out, manifest, stderr = latent_shards
    assert "encoding train latents" in stderr and "3/3" in stderr  # one bar: 10 images in batches of 4
    assert "writing" not in stderr
    assert manifest == read_manifest(out / "manifest.json")
    assert (manifest["latent_channels"], manifest["latent_size"], manifest["scale_factor"]) == (4, 8, SCALE)
    assert manifest["vae"] == str(tiny_vae_dir.resolve()) and manifest["classes"] == [0, 1, 2, 3]
    assert (manifest["dtype"], manifest["posterior"]) == ("float16", "mean")
    split = manifest["splits"]["train"]
    assert split["flip_copies"] and split["source"].endswith("images-train-{000000..000001}.tar")
    assert split["pattern"] == "latents-train-{000000..000002}.tar" and split["samples"] == NUM_IMAGES
    assert [s["samples"] for s in split["shards"]] == [4, 4, 2] and split["skipped"] == 0
    with tarfile.open(out / "latents-train-000000.tar") as tar:
        assert tar.getnames()[:3] == ["img000.cls", "img000.latent.npy", "img000.latent_flip.npy"]
        stored = np.load(io.BytesIO(tar.extractfile("img000.latent.npy").read()))
    assert stored.dtype == np.float16 and stored.shape == (4, 8, 8)


def test_latents_round_trip_equal_the_vae_mean_and_its_flip(latent_shards, tiny_vae_dir, image_shards):
    out, manifest, _ = latent_shards
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    datamodule = LatentShardsDataModule(pattern, pattern, batch_size=4, num_workers=0)
    assert (datamodule.image_size, datamodule.channels, datamodule.num_classes) == (8, 4, 4)
    assert datamodule.pre_encoded and datamodule.scale_factor == SCALE
    latents, labels = eval_batches(datamodule)
    images = image_shards[1]
    assert latents.shape == (NUM_IMAGES, 4, 8, 8) and latents.dtype == torch.float32
    assert labels.tolist() == [i % 4 for i in range(NUM_IMAGES)]
    torch.testing.assert_close(latents, reference_latents(tiny_vae_dir, images), atol=2e-3, rtol=2e-3)
    first = next(iter(wds.tarfile_to_samples()([{"url": str(out / "latents-train-000000.tar")}])))
    stored_flip = torch.from_numpy(np.load(io.BytesIO(first["latent_flip.npy"])).astype(np.float32))
    expected_flip = reference_latents(tiny_vae_dir, images[:1, :, ::-1].copy())[0]
    torch.testing.assert_close(stored_flip, expected_flip, atol=2e-3, rtol=2e-3)
    decoder = LatentDecoder(4, 8, 4, flip=True)
    rng = random.Random(0)
    draws = [decoder(first, rng)[0] for _ in range(40)]
    flipped = [torch.equal(draw, stored_flip) for draw in draws]
    assert all(f or torch.equal(draw, latents[0]) for f, draw in zip(flipped, draws))
    assert 10 <= sum(flipped) <= 30  # about half the training draws take the flipped copy
    assert torch.equal(decoder(first, None)[0], latents[0])  # evaluation: never flipped


def test_posterior_samples_and_float32_storage(tmp_path, tiny_vae_dir, image_shards):
    options = {"scale_factor": SCALE, "image_size": 16, "batch_size": 5, "device": "cpu", "progress": False,
               "split": "val", "dtype": "float32", "sample": True}
    first = encode_latent_shards(image_shards[0], tmp_path / "a", str(tiny_vae_dir), seed=3, **options)
    encode_latent_shards(image_shards[0], tmp_path / "b", str(tiny_vae_dir), seed=3, **options)
    assert first["posterior"] == "sample" and first["splits"]["val"]["pattern"] == "latents-val-000000.tar"
    assert (tmp_path / "a" / "latents-val-000000.tar").read_bytes() == (tmp_path / "b" / "latents-val-000000.tar").read_bytes()
    pattern = str(tmp_path / "a" / "latents-val-000000.tar")
    latents, _ = eval_batches(LatentShardsDataModule(pattern, pattern, batch_size=5, num_workers=0))
    mean = reference_latents(tiny_vae_dir, image_shards[1])
    assert not torch.allclose(latents, mean, atol=1e-3)  # a sample, not the mean
    both = encode_latent_shards(image_shards[0], tmp_path / "a", str(tiny_vae_dir), seed=3, flip_copies=True,
                                **{**options, "split": "train"})
    assert set(both["splits"]) == {"train", "val"} and both["total"] == 2 * NUM_IMAGES
    assert both["splits"]["train"]["flip_copies"] and not both["splits"]["val"]["flip_copies"]
    with pytest.raises(ValueError, match="posterior='sample', these have posterior='mean'"):
        encode_latent_shards(image_shards[0], tmp_path / "a", str(tiny_vae_dir), scale_factor=SCALE, image_size=16,
                             device="cpu", progress=False, split="train", dtype="float32")


def test_shards_latents_cli(tmp_path, tiny_vae_dir, image_shards, capsys):
    main(["shards", "latents", image_shards[0], str(tmp_path), "--vae", str(tiny_vae_dir), "--scale_factor", "0.5",
          "--image_size", "16", "--flip_copies", "true", "--device", "cpu", "--batch_size", "8"])
    manifest = read_manifest(tmp_path / "manifest.json")
    assert manifest["splits"]["train"]["flip_copies"] and manifest["splits"]["train"]["samples"] == NUM_IMAGES
    assert "4x8x8" in capsys.readouterr().out


def tiny_dit(vae_dir, scale=SCALE) -> DiT:
    backbone = DiTBackbone(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4)
    return DiT(backbone=backbone, autoencoder=StableDiffusionVAE(str(vae_dir), scale_factor=scale),
               sampler=DDIMSampler(steps=2), ema_decay=0.9)


def test_check_data_compares_latents_directly(latent_shards, tiny_vae_dir, image_shards):
    out, manifest, _ = latent_shards
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    module = tiny_dit(tiny_vae_dir)
    module.check_data(LatentShardsDataModule(pattern))  # latent side 8, 4 channels: no downsampling applied again
    module.check_data(ImageShardsDataModule(image_shards[0], image_size=16, num_classes=4))  # images: 16 / 2 = 8
    with pytest.raises(ValueError, match="data image_size 16 gives inputs of side 16"):
        module.check_data(LatentShardsDataModule(pattern, latent_size=16))
    with pytest.raises(ValueError, match="gives 3 channels"):
        module.check_data(LatentShardsDataModule(pattern, latent_channels=3))
    with pytest.raises(ValueError, match="scaled by 0.5 but the autoencoder uses scale_factor 0.18215"):
        tiny_dit(tiny_vae_dir, scale=0.18215).check_data(LatentShardsDataModule(pattern))


def test_dit_fits_on_latent_shards_without_encoding(latent_shards, tiny_vae_dir, tmp_path, monkeypatch, one_thread):
    out, manifest, _ = latent_shards
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    datamodule = LatentShardsDataModule(pattern, pattern, batch_size=4, num_workers=0, shuffle_buffer=4)
    module = tiny_dit(tiny_vae_dir)

    def no_encoding(images):
        raise AssertionError("pre-encoded batches must not be encoded again")

    monkeypatch.setattr(module.autoencoder, "encode", no_encoding)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2 and module.inputs_pre_encoded
    samples = module.generate(torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 16, 16) and torch.isfinite(samples).all()  # the VAE still decodes
