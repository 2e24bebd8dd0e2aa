import pytest
import torch

from maskdiff.backbones.patching import Patchifier
from maskdiff.corruption import GaussianNoise, TokenMasking, random_masking, tube_masking
from maskdiff.corruption.masking import gather_tokens, restore_tokens


@pytest.mark.parametrize("ratio,expected_keep", [(0.75, 49), (0.5, 98), (0.3, 137), (0.0, 196)])
def test_random_masking_counts_and_inverse(ratio, expected_keep):
    masking = random_masking(8, 196, ratio, generator=torch.Generator().manual_seed(0))
    assert masking.ids_keep.shape == (8, expected_keep)
    assert (masking.mask.sum(1) == 196 - expected_keep).all()
    tokens = torch.randn(8, 196, 5)
    kept = gather_tokens(tokens, masking.ids_keep)
    assert not masking.mask.gather(1, masking.ids_keep).any()  # kept tokens are exactly the visible ones
    restored = restore_tokens(kept, torch.zeros(1, 1, 5), masking)
    visible = ~masking.mask
    torch.testing.assert_close(restored[visible], tokens[visible])
    assert (restored[masking.mask] == 0).all()
    shuffle = torch.argsort(masking.ids_restore, dim=1)
    assert torch.equal(torch.gather(shuffle, 1, masking.ids_restore), torch.arange(196).expand(8, -1))


def test_masks_differ_per_sample_and_are_seeded():
    a = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask[0], a.mask[1])


def test_tube_masking_hides_whole_tubes():
    masking = tube_masking(3, (4, 5, 5), 0.9, generator=torch.Generator().manual_seed(0))
    per_frame = masking.mask.view(3, 4, 25)
    assert (per_frame == per_frame[:, :1]).all()
    assert (per_frame.sum(-1) == 25 - int(25 * 0.1)).all()
    assert masking.ids_keep.shape == (3, 4 * int(25 * 0.1))
    assert not masking.mask.gather(1, masking.ids_keep).any()


def test_invalid_ratio_is_rejected():
    with pytest.raises(ValueError, match="1.2"):
        random_masking(1, 4, 1.2)
    with pytest.raises(ValueError, match="1.0"):
        TokenMasking(1.0)


def test_patchify_layout_and_round_trip():
    patchifier = Patchifier(input_size=4, patch_size=2, channels=3)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = patchifier.patchify(x)
    assert tokens.shape == (2, 4, 12)
    # token 1 is the top-right patch; inside it (p_row, p_col, channel) with channel fastest
    expected = torch.stack([x[0, c, p, 2 + q] for p in range(2) for q in range(2) for c in range(3)])
    torch.testing.assert_close(tokens[0, 1], expected)
    torch.testing.assert_close(patchifier.unpatchify(tokens), x)
    video = Patchifier(input_size=4, patch_size=2, channels=3, frames=4, tubelet=2)
    clip = torch.randn(2, 3, 4, 4, 4)
    assert video.patchify(clip).shape == (2, 2 * 2 * 2, 2 * 2 * 2 * 3)
    torch.testing.assert_close(video.unpatchify(video.patchify(clip)), clip)


def test_patch_size_must_divide_input():
    with pytest.raises(ValueError, match="input size 30 is not divisible by patch size 4"):
        Patchifier(input_size=30, patch_size=4, channels=3)


def test_gaussian_noise_view():
    corruption = GaussianNoise("linear", 1000)
    clean = torch.randn(5, 16, 4)
    (view,) = corruption(clean, (4, 4))
    assert view.t.shape == (5,) and view.t.dtype == torch.long and view.t.max() < 1000
    torch.testing.assert_close(view.tokens, corruption.schedule.q_sample(clean, view.t, view.noise))
    assert view.masking is None and not view.noise_free
