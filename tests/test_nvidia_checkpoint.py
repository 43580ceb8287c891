"""NVIDIA's model.pth both ways (issue 24.6): the recipe saves a plain state dict of its NeuMF (four embedding
tables; "module." prefixes when saved from DDP). It is read wherever a checkpoint is read, with the shape worked
out from the tensors, and written from ours, so that a model moves between the two projects."""
import itertools

import pytest
import torch
from torch import nn

import checkpoint
import dataloading
import inference
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


@pytest.fixture
def recipe_layout_model(tiny_cache):
    cache = load_cache(str(tiny_cache))
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
def test_an_nvidia_model_pth_is_evaluated_as_the_recipe_scores_it(tiny_cache, recipe_layout_model, tmp_path, prefix,
                                                                  capsys):
    cache = load_cache(str(tiny_cache))
    path = tmp_path / "model.pth"
    torch.save({prefix + name: t for name, t in recipe_layout_model.state_dict().items()}, path)
    expected = hr_of(recipe_layout_model, cache)
    model, ckpt = checkpoint.load_model(str(path), cache, CPU)
    assert ckpt["config"] == {"nb_users": 300, "nb_items": 200, "mf_dim": 8, "mlp_layer_sizes": [32, 16, 8],
                              "dropout": 0.5}
    assert hr_of(model, cache) == pytest.approx(expected, abs=1e-9)
    ncf.main(["--data", str(tiny_cache), "--mode", "test", "--load_checkpoint_path", str(path), "--opt_level", "O0"])
    out = capsys.readouterr().out
    assert f"HR@10 {expected['hr']:.4f}" in out


def test_the_logged_validation_loss_is_the_recipes(tiny_cache, recipe_layout_model):
    """The recipe's validation_loss: binary cross-entropy of sigmoid(score) against 1 for the held-out item and
    0 for each negative, averaged over every candidate of every test user."""
    cache = load_cache(str(tiny_cache))
    data = dataloading.TestData.from_cache(cache, CPU)
    users = data.users[:, None].expand_as(data.candidates).reshape(-1).long()
    with torch.no_grad():
        predictions = torch.sigmoid(recipe_layout_model(users, data.candidates.reshape(-1).long()).double())
    labels = torch.zeros_like(data.candidates, dtype=torch.float64)
    labels[:, 0] = 1
    expected = nn.functional.binary_cross_entropy(predictions, labels.reshape(-1)).item()
    assert hr_of(recipe_layout_model, cache)["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_ours_written_in_the_recipes_layout_loads_into_its_model(tiny_cache, recipe_layout_model, tmp_path):
    cache = load_cache(str(tiny_cache))
    path = tmp_path / "model.pth"
    torch.save(recipe_layout_model.state_dict(), path)
    ours = checkpoint.load_checkpoint(str(path), cache)
    back = RecipeLayoutNeuMF(300, 200, 8, [32, 16, 8]).eval()
    back.load_state_dict(checkpoint.to_nvidia(ours))  # strict: every name and shape of the recipe's layout
    for name, tensor in recipe_layout_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_export_format_nvidia_writes_what_the_recipes_model_loads(exported_tiny, tmp_path, capsys):
    """`inference.py export --format nvidia`: a trained checkpoint of ours becomes a model.pth that the recipe's
    NeuMF loads strictly and scores as ours does; a file already at --output is never replaced."""
    ours, tiny_cache = exported_tiny.checkpoint, exported_tiny.cache_dir
    path = tmp_path / "nvidia.pth"
    argv = ["export", "--format", "nvidia", "--checkpoint", str(ours), "--data", str(tiny_cache), "--output", str(path)]
    inference.main(argv)
    assert "in NVIDIA's recipe format" in capsys.readouterr().out
    cache = load_cache(str(tiny_cache))
    model, _ = checkpoint.load_model(str(ours), cache, CPU)
    recipe = RecipeLayoutNeuMF(300, 200, 8, [32, 16, 8]).eval()
    recipe.load_state_dict(torch.load(path, weights_only=True))  # strict: the recipe's names and shapes only
    assert hr_of(recipe, cache) == pytest.approx(hr_of(model, cache), rel=1e-6)  # ours factored
    before = path.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        inference.main(argv)
    assert exit_.value.code == 2 and "writes a new file only" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("edit", ["drop mlp.1.weight", "transpose a table", "other item count", "a weight twice",
                                  "an integer table"])
def test_an_edited_nvidia_model_pth_is_refused_in_one_line(tiny_cache, recipe_layout_model, tmp_path, edit):
    state = recipe_layout_model.state_dict()
    if edit == "drop mlp.1.weight":
        del state["mlp.1.weight"]
    elif edit == "a weight twice":  # hostile pass NV_mixed_prefix: which of the two would be used?
        state["module.mlp.0.weight"] = state["mlp.0.weight"] * 2
    elif edit == "an integer table":
        state["mf_user_embed.weight"] = state["mf_user_embed.weight"].long()
    elif edit == "transpose a table":
        state["mlp_item_embed.weight"] = state["mlp_item_embed.weight"].t().contiguous()
    else:
        state["mf_item_embed.weight"] = state["mf_item_embed.weight"][:150]
        state["mlp_item_embed.weight"] = state["mlp_item_embed.weight"][:150]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(UserError):
        checkpoint.load_checkpoint(str(tmp_path / "model.pth"), load_cache(str(tiny_cache)))


def test_a_branch_alone_has_no_recipe_layout():
    with pytest.raises(UserError, match="NeuMF only"):
        checkpoint.to_nvidia({"config": {"model": "gmf", "mf_dim": 8, "mlp_layer_sizes": []}, "model": {}})


def test_an_export_of_an_nvidia_model_pth_says_its_dataset_is_unchecked(tiny_cache, recipe_layout_model, tmp_path,
                                                                        recwarn):
    """It records no dataset, so the export's id maps are the given cache's on trust: the manifest says so and
    every recommend warns (hostile pass E20: the manifest claimed the cache's identity as checked)."""
    import json

    path = tmp_path / "model.pth"
    torch.save(recipe_layout_model.state_dict(), path)
    inference.main(["export", "--checkpoint", str(path), "--data", str(tiny_cache), "--format", "torch-export",
                    "--output", str(tmp_path / "export")])
    assert json.loads((tmp_path / "export" / "manifest.json").read_text())["dataset_checked"] is False
    recwarn.clear()
    user = str(load_cache(str(tiny_cache)).user_ids[0].item())
    inference.main(["recommend", "--model", str(tmp_path / "export"), "--users", user])
    assert any("records no dataset" in str(w.message) for w in recwarn.list)
