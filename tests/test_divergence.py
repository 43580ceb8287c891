"""A diverging run stops and a diverged model never scores: a loss or weights that stop being finite end
training with one stderr line naming the fix, before any figure or checkpoint, and --mode test refuses a
checkpoint of non-finite weights.

ncf.py runs in-process here (its main(argv), the code its command line runs) on the tiny dataset.
"""
import math

import pytest
import torch
from helpers import TINY_MODEL, TINY_TRAIN, one_line, run_ncf

import dataloading
import ncf
from dataloading import load_cache
from devices import choose_precision
from neumf import build_model

CPU = torch.device("cpu")


def test_a_model_of_nans_scores_hr_zero(tiny_cache):
    cache = load_cache(str(tiny_cache))
    model = build_model({"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.0}, CPU)
    with torch.no_grad():
        model.final.weight.fill_(float("nan"))
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    data = dataloading.TestData.from_cache(cache, CPU)
    figures = ncf.evaluate(model, data, 10, 1 << 20, choose_precision("O0", "auto", CPU), ctx)
    assert math.isnan(figures.pop("eval_loss")) and figures == {"hr": 0.0, "ndcg": 0.0, "mrr": 0.0}


def test_a_diverging_run_stops_before_any_figure_or_checkpoint(tiny_cache, tmp_path, capsys):
    status, out, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", tmp_path / "ck",
                               "--log_path", tmp_path / "log.json", *TINY_MODEL, "-l", "1e15")
    one_line(err, status, 2, "training diverged", "--learning_rate")
    assert not [line for line in out.splitlines() if line.startswith("epoch")]  # no epoch figures reported
    assert not (tmp_path / "ck" / "model.pth").exists()


def test_non_finite_weights_stop_training_even_with_a_finite_loss(tiny_cache, tmp_path, capsys, monkeypatch):
    """A NaN that reaches the weights but not yet the loss is caught before evaluation."""
    real_epoch = ncf.train_epoch

    def poisoned(model, *args, **kwargs):
        result = real_epoch(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("inf")
        return result

    monkeypatch.setattr(ncf, "train_epoch", poisoned)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL)
    one_line(err, status, 2, "non-finite weights")
    assert not (tmp_path / "ck" / "model.pth").exists()


def test_mode_test_refuses_a_checkpoint_with_non_finite_weights(tiny_cache, trained_tiny, tmp_path, capsys):
    ckpt = torch.load(trained_tiny / "model.pth", weights_only=True)
    ckpt["model"]["final.bias"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pth")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "nan.pth")
    one_line(err, status, 2, "non-finite weights")


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_epoch(synthetic_cache, tmp_path, run_cli, assert_user_error):
    """The command line, end to end: one line naming the epoch and the flag, and no epoch's figures."""
    result = run_cli(["ncf.py", "--data", synthetic_cache, "--checkpoint_dir", tmp_path / "ck", *TINY_TRAIN,
                      "--opt_level", "O0", "-l", "1e12", "-e", "5"])
    assert_user_error(result, "diverged", "epoch 1", "--learning_rate")
    assert "epoch 1 |" not in result.stdout
