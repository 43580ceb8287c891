"""NVIDIA's model.pth both ways (issue 24.6): the recipe saves a plain state dict of its NeuMF (four embedding
tables; "module." prefixes when saved from DDP). It is read wherever a checkpoint is read, with the shape worked
out from the tensors, and written from ours, so that a model moves between the two projects."""
import itertools

import pytest
import torch
from conftest import make_tiny_cache
from torch import nn

import checkpoint
import dataloading
import ncf
from cli import UserError
from dataloading import load_cache
from devices import choose_precision

CPU = torch.device("cpu")


class RecipeLayoutNeuMF(nn.Module):
    """The recipe's NeuMF layout, written for this test from the paper's equations: separate GMF and MLP
    embeddings per side, ReLU MLP, output layer on [GMF | MLP]."""

    def __init__(self, users, items, factors, layers):
        super().__init__()
        self.mf_user_embed, self.mf_item_embed = nn.Embedding(users, factors), nn.Embedding(items, factors)
        self.mlp_user_embed = nn.Embedding(users, layers[0] // 2)
        self.mlp_item_embed = nn.Embedding(items, layers[0] // 2)
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(layers))
        self.final = nn.Linear(factors + layers[-1], 1)

    def forward(self, user, item):
        gmf = self.mf_user_embed(user) * self.mf_item_embed(item)
        hidden = torch.cat((self.mlp_user_embed(user), self.mlp_item_embed(item)), dim=1)
        for layer in self.mlp:
            hidden = torch.relu(layer(hidden))
        return self.final(torch.cat((gmf, hidden), dim=1)).squeeze(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("nvidia"))


@pytest.fixture
def recipe_model(tiny):
    cache = load_cache(str(tiny))
    torch.manual_seed(3)
    model = RecipeLayoutNeuMF(cache.num_users, cache.num_items, 8, [32, 16, 8]).eval()
    for table in (model.mf_user_embed, model.mf_item_embed, model.mlp_user_embed, model.mlp_item_embed):
        nn.init.normal_(table.weight, std=0.5)  # scores far apart: no near-ties between the two layouts
    return model


def hr_of(model, cache):
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    data = dataloading.TestData.from_cache(cache, CPU)
    return ncf.evaluate(model, data, 10, 1 << 20, choose_precision("O0", "auto", CPU), ctx)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_an_nvidia_model_pth_is_evaluated_as_the_recipe_scores_it(tiny, recipe_model, tmp_path, prefix, capsys):
    cache = load_cache(str(tiny))
    path = tmp_path / "model.pth"
    torch.save({prefix + name: t for name, t in recipe_model.state_dict().items()}, path)
    expected = hr_of(recipe_model, cache)
    model, ckpt = checkpoint.load_model(str(path), cache, CPU)
    assert ckpt["config"] == {"nb_users": 300, "nb_items": 200, "mf_dim": 8, "mlp_layer_sizes": [32, 16, 8],
                              "dropout": 0.5}
    assert hr_of(model, cache) == pytest.approx(expected, abs=1e-9)
    ncf.main(["--data", str(tiny), "--mode", "test", "--load_checkpoint_path", str(path), "--opt_level", "O0"])
    out = capsys.readouterr().out
    assert f"HR@10 {expected['hr']:.4f}" in out


def test_ours_written_in_the_recipes_layout_loads_into_its_model(tiny, recipe_model, tmp_path):
    cache = load_cache(str(tiny))
    path = tmp_path / "model.pth"
    torch.save(recipe_model.state_dict(), path)
    ours = checkpoint.load_checkpoint(str(path), cache)
    back = RecipeLayoutNeuMF(300, 200, 8, [32, 16, 8]).eval()
    back.load_state_dict(checkpoint.to_nvidia(ours))  # strict: every name and shape of the recipe's layout
    for name, tensor in recipe_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("edit", ["drop mlp.1.weight", "transpose a table", "other item count"])
def test_an_edited_nvidia_model_pth_is_refused_in_one_line(tiny, recipe_model, tmp_path, edit):
    state = recipe_model.state_dict()
    if edit == "drop mlp.1.weight":
        del state["mlp.1.weight"]
    elif edit == "transpose a table":
        state["mlp_item_embed.weight"] = state["mlp_item_embed.weight"].t().contiguous()
    else:
        state["mf_item_embed.weight"] = state["mf_item_embed.weight"][:150]
        state["mlp_item_embed.weight"] = state["mlp_item_embed.weight"][:150]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(UserError):
        checkpoint.load_checkpoint(str(tmp_path / "model.pth"), load_cache(str(tiny)))


def test_a_branch_alone_has_no_recipe_layout():
    with pytest.raises(UserError, match="NeuMF only"):
        checkpoint.to_nvidia({"config": {"model": "gmf", "mf_dim": 8, "mlp_layer_sizes": []}, "model": {}})
