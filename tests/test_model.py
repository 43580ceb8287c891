"""NeuMF shapes, initialisation and configuration (spec §4)."""
import math

import pytest
import torch

from neumf import ItemPopularity, NeuMF


def test_forward_gives_one_logit_per_pair():
    model = NeuMF(50, 30, mf_dim=8, mlp_layer_sizes=(16, 8, 4), dropout=0.0)
    users = torch.tensor([0, 1, 49], dtype=torch.int32)
    items = torch.tensor([0, 29, 5])
    assert model(users, items).shape == (3,)
    assert model(users.long(), items.int()).dtype == torch.float32


def test_layer_shapes_follow_the_recipe():
    model = NeuMF(10, 20, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64))
    assert model.user_embed.weight.shape == (10, 64 + 128)
    assert model.item_embed.weight.shape == (20, 64 + 128)
    assert [tuple(m.weight.shape) for m in model.mlp] == [(256, 256), (128, 256), (64, 128)]
    assert model.final.weight.shape == (1, 64 + 64)
    mlp = 256 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64
    assert sum(p.numel() for p in model.parameters()) == 30 * 192 + mlp + 129


def test_initialisation():
    torch.manual_seed(0)
    model = NeuMF(2000, 3000, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64))
    assert model.user_embed.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert model.item_embed.weight.mean().abs().item() < 1e-3
    for layer in model.mlp:
        fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
        assert layer.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))
        assert layer.bias.abs().sum().item() == 0
    assert model.final.weight.abs().max().item() <= math.sqrt(3 / 128)
    assert model.final.bias.item() == 0


def test_odd_first_layer_is_refused():
    with pytest.raises(ValueError, match="even"):
        NeuMF(5, 5, mlp_layer_sizes=(15, 8))


def test_config_rebuilds_the_same_model():
    model = NeuMF(7, 9, mf_dim=4, mlp_layer_sizes=(8, 4), dropout=0.25)
    clone = NeuMF(**model.config)
    clone.load_state_dict(model.state_dict())
    users, items = torch.arange(7), torch.arange(7)
    model.eval()
    clone.eval()
    assert torch.equal(model(users, items), clone(users, items))


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = NeuMF(5, 5, mf_dim=4, mlp_layer_sizes=(8, 8, 4), dropout=0.5)
    model.user_embed.weight.data.normal_()
    model.item_embed.weight.data.normal_()
    users = items = torch.arange(5)
    model.eval()
    assert torch.equal(model(users, items), model(users, items))
    model.train()
    assert not torch.equal(model(users, items), model(users, items))


def test_logits_stay_fp32_under_autocast():
    model = NeuMF(5, 5, mf_dim=4, mlp_layer_sizes=(8, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.arange(5), torch.arange(5)).dtype == torch.float32


def test_item_popularity_scores_by_training_count():
    model = ItemPopularity(torch.tensor([2, 2, 0, 2, 1]), nb_items=4)
    assert model(torch.zeros(4), torch.arange(4)).tolist() == [1.0, 1.0, 3.0, 0.0]
