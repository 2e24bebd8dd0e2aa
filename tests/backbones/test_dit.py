import pytest
import torch

from maskdiff.backbones import create_backbone, list_backbones
from maskdiff.backbones.embeddings import sincos_2d, timestep_frequencies
from maskdiff.corruption import random_masking


def official_param_count(depth, d, p, c=4, tokens=256):
    """Parameter count of the official DiT (incl. frozen pos_embed), from its module list."""
    return (p * p * c * d + d) + tokens * d + (256 * d + d + d * d + d) + 1001 * d + depth * (18 * d * d + 15 * d) \
        + (2 * d * d + 2 * d) + d * p * p * 2 * c + p * p * 2 * c


@pytest.mark.parametrize("name,depth,hidden", [("DiT-XL/2", 28, 1152), ("DiT-S/2", 12, 384), ("DiT-B/4", 12, 768)])
def test_registry_sizes_match_official_parameter_counts(name, depth, hidden):
    with torch.device("meta"):  # counts only: no memory, no initialisation work
        model = create_backbone(name)
    patch = model.patchifier.patch_size
    count = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    assert count == official_param_count(depth, hidden, patch, tokens=(32 // patch) ** 2)
    if name == "DiT-XL/2":
        assert count == 675_129_632


def test_registry_lists_all_sizes():
    names = list_backbones("DiT-")
    assert {"DiT-S/2", "DiT-B/4", "DiT-L/8", "DiT-XL/2"} <= set(names)
    with pytest.raises(KeyError, match="DiT-Q/2"):
        create_backbone("DiT-Q/2")


def test_shapes_and_zero_init_output():
    model = create_backbone("DiT-Nano/2", input_size=8, in_channels=3, num_classes=10)
    tokens = torch.randn(4, 16, 12)
    out = model(tokens, torch.tensor([0.0, 10.0, 500.0, 999.0]), torch.tensor([0, 1, 2, 10]))
    assert out.shape == (4, 16, 24)
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer
    assert model.forward_features(tokens, torch.zeros(4), torch.zeros(4, dtype=torch.long)).shape == (4, 16, 32)
    assert create_backbone("DiT-Nano/2", input_size=8, in_channels=3, learn_sigma=False)(tokens, torch.zeros(4)).shape == (4, 16, 12)


def test_blocks_start_as_identity():
    model = create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10)
    x = torch.randn(2, 16, 32)
    c = torch.randn(2, 32)
    torch.testing.assert_close(model.blocks[0](x, c), x)


def test_dit_rejects_masking_and_bad_labels():
    model = create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10).eval()
    tokens = torch.randn(2, 16, 4)
    with pytest.raises(ValueError, match="MDT"):
        model(tokens, torch.zeros(2), torch.zeros(2, dtype=torch.long), random_masking(2, 16, 0.5))
    with pytest.raises(ValueError, match="0..9"):
        model(tokens, torch.zeros(2), torch.tensor([3, 12]))


def test_label_dropout_uses_null_class_only_in_training():
    model = create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.5)
    labels = torch.zeros(1000, dtype=torch.long)
    model.train()
    emb = model.y_embedder(labels)
    dropped = (emb == model.y_embedder.embedding_table.weight[10]).all(-1).float().mean()
    assert 0.4 < dropped < 0.6
    model.eval()
    assert not (model.y_embedder(labels) == model.y_embedder.embedding_table.weight[10]).all(-1).any()


def test_timestep_embedding_is_cos_first():
    t = torch.tensor([0.0, 7.0])
    emb = timestep_frequencies(t, 256)
    torch.testing.assert_close(emb[:, 0], torch.cos(t))
    torch.testing.assert_close(emb[:, 128], torch.sin(t))


def test_sincos_2d_puts_w_axis_first():
    table = sincos_2d(8, 3)  # (9, 8); token k = (h, w) = divmod(k, 3)
    # first half depends only on w, second half only on h
    assert (table[1, :4] != table[0, :4]).any() and (table[3, :4] == table[0, :4]).all()
    assert (table[3, 4:] != table[0, 4:]).any() and (table[1, 4:] == table[0, 4:]).all()


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = create_backbone("DiT-Nano/2", input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tokens, t, y = torch.randn(2, 16, 4), torch.tensor([3.0, 600.0]), torch.tensor([1, 2])
    model(tokens, t, y).square().sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(tokens, t, y).square().sum().backward()
    for ref, p in zip(reference, model.parameters()):
        torch.testing.assert_close(p.grad, ref)
