"""NeuMF shapes, initialisation and configuration."""
import math

import pytest
import torch

from metrics import ItemPopularity
from model_config import ModelConfig
from neumf import NeuMF, build_model


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


def assert_uniform(weight, bound, what):
    """weight looks like U(-bound, bound): its extremes reach the bound (within 1%) and stay inside it,
    its std is bound / sqrt(3) and its mean near 0. Sharp for a few thousand values or more."""
    values = weight.detach().double().flatten()
    n = values.numel()
    assert values.abs().max().item() <= bound, what
    assert values.max().item() >= 0.99 * bound and values.min().item() <= -0.99 * bound, what
    assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03), what
    assert abs(values.mean().item()) < 6 * bound / math.sqrt(3 * n), what  # six standard errors


@pytest.fixture(scope="module")
def recipe_model():
    """The recipe's layer sizes on tables of 2000 and 3000 rows (384k and 576k embedding values)."""
    torch.manual_seed(0)
    return NeuMF(2000, 3000, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64))


@pytest.mark.parametrize("table", ["user_embed", "item_embed"])
def test_embeddings_are_normal_with_std_0_01(recipe_model, table):
    weight = getattr(recipe_model, table).weight.detach().double()
    for part in weight.split((64, 128), 1):  # the GMF and the MLP columns alike
        assert part.std().item() == pytest.approx(0.01, rel=0.01)
        assert abs(part.mean().item()) < 6 * 0.01 / math.sqrt(part.numel())
        # Normal, not uniform: 4.5% of N(0, s) lies beyond 2s (none of U(-s sqrt3, s sqrt3) does).
        assert (part.abs() > 0.02).double().mean().item() == pytest.approx(0.0455, abs=0.004)


def test_mlp_layers_are_glorot_uniform(recipe_model):
    for layer in recipe_model.mlp:
        fan_out, fan_in = layer.weight.shape
        assert_uniform(layer.weight, math.sqrt(6 / (fan_in + fan_out)), f"{fan_in}->{fan_out}")
        assert_pytorch_default_bias(layer)


def assert_pytorch_default_bias(layer):
    """The recipe leaves biases at nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the paper's Keras zeroes them)."""
    bound = 1 / math.sqrt(layer.in_features)
    assert layer.bias.abs().max().item() <= bound
    assert layer.bias.abs().max().item() > 0.3 * bound or (layer.bias.numel() == 1 and layer.bias.item() != 0)


def test_output_layer_is_lecun_uniform(recipe_model):
    # The recipe's 128 output weights: within the bound, and nearly reaching it.
    bound = math.sqrt(3 / 128)
    weight = recipe_model.final.weight
    assert weight.abs().max().item() <= bound and weight.abs().max().item() >= 0.9 * bound
    assert_pytorch_default_bias(recipe_model.final)
    # An output layer of 16,384 inputs makes the distribution check sharp.
    torch.manual_seed(1)
    wide = NeuMF(3, 3, mf_dim=8192, mlp_layer_sizes=(16, 8192))
    assert_uniform(wide.final.weight, math.sqrt(3 / 16384), "output layer")
    assert_pytorch_default_bias(wide.final)


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


def test_scoring_s_output_layer_runs_in_fp32_under_autocast_and_cpu_training_s_in_bf16():
    """Logits near 3 (bf16's step there is 1/64) that differ by about 1e-3: scoring keeps them apart (bf16 logits would
    tie candidates, which HR@k counts against the model); CPU training, which ranks nothing, rounds them to bf16."""
    model = build_model(ModelConfig(5, 64, 4, (8, 4), 0.0, "mlp"), "cpu")
    with torch.no_grad():
        model.final.bias.fill_(3.0)
        model.final.weight.mul_(0.01)
    users, items = torch.zeros(64, dtype=torch.int64), torch.arange(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, logits = model.eval()(users, items), model.train()(users, items)
    assert scores.dtype == logits.dtype == torch.float32
    assert scores.unique().numel() > 32 and (scores - 3.0).abs().max() < 1 / 128  # (bf16 hidden units may tie)
    assert logits.unique().numel() <= 2


def test_the_factored_path_s_gmf_runs_in_bf16_in_cpu_training_under_autocast_and_in_fp32_when_scoring(monkeypatch):
    """GMF on the factored path (batch >= table rows) in the MLP's dtype in training (bf16 under autocast, as the
    output layer), in fp32 when the model scores (evaluation) and without autocast."""
    import cpu_kernels

    model = build_model(ModelConfig(5, 7, 4, (8, 4), 0.0), "cpu")
    dtypes, gather_dot = [], cpu_kernels.gather_dot
    monkeypatch.setattr(cpu_kernels, "gather_dot", lambda *args: dtypes.append(gather_dot(*args).dtype) or
                        gather_dot(*args))
    users, items = torch.arange(64) % 5, torch.arange(64) % 7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(users, items).sum().backward()
        model.eval()(users, items)
    model.train()(users, items)
    assert dtypes == [torch.bfloat16, torch.float32, torch.float32]
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_item_popularity_scores_by_training_count():
    model = ItemPopularity(torch.tensor([2, 2, 0, 2, 1]), nb_items=4)
    assert model(torch.zeros(4), torch.arange(4)).tolist() == [1.0, 1.0, 3.0, 0.0]


def test_the_model_config_round_trips_through_the_checkpoint_dict_and_refuses_what_no_model_is():
    from model_config import ModelConfig

    for config in (ModelConfig(3, 4), ModelConfig(3, 4, 8, (16, 8), 0.0, "mlp"), ModelConfig(3, 4, 8, (), 0.1, "gmf")):
        assert ModelConfig.from_dict(config.as_dict()) == config
    assert "model" not in ModelConfig(3, 4).as_dict()  # NeuMF's dict as checkpoints stored it before the branches
    assert ModelConfig(3, 4, 8, (16, 8), model="gmf").mlp_layer_sizes == ()  # a branch alone ignores the other's
    for broken in ({"nb_users": 3}, {"nb_users": 3, "nb_items": 4, "mlp_layer_sizes": "32 16"},
                   {"nb_users": 3, "nb_items": 4, "dropout": 1.0}, {"nb_users": 3, "nb_items": 4, "mf_dim": True},
                   {"nb_users": 0, "nb_items": 4}, {"nb_users": 3, "nb_items": 4, "mlp_layer_sizes": [16, -8]},
                   {"nb_users": 3, "nb_items": 4, "model": "mf"}, {"nb_users": 3, "nb_items": 4, "extra": 1}):
        with pytest.raises(ValueError):
            ModelConfig.from_dict(broken)
