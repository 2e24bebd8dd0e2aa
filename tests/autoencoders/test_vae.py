import pytest
import torch

from maskdiff.autoencoders import PixelSpace, StableDiffusionVAE

diffusers = pytest.importorskip("diffusers", reason="the latent extra (diffusers) is part of the test extra")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, sample_size=16,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


def test_vae_encodes_scaled_latents_and_decodes(tiny_vae_dir):
    autoencoder = StableDiffusionVAE(str(tiny_vae_dir), scale_factor=0.5, sample=False)
    assert autoencoder.downsample == 2 and autoencoder.latent_channels == 4
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = autoencoder.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    reference = diffusers.AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(latents, reference.encode(images).latent_dist.mean * 0.5)
        torch.testing.assert_close(autoencoder.decode(latents), reference.decode(latents / 0.5).sample)


def test_missing_vae_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        StableDiffusionVAE(str(tmp_path / "nowhere"))


def test_pixel_space_is_identity():
    x = torch.randn(2, 1, 4, 4)
    assert PixelSpace().encode(x) is x and PixelSpace().decode(x) is x
