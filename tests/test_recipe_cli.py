"""A recipe user's command lines and log readers work unchanged (issue 24): NVIDIA's flags and short forms
mean what they mean there, --checkpoint_dir '' saves nothing, the JSON log carries the recipe's keys."""
import json
import math

import pytest
from conftest import TINY_MODEL, make_tiny_cache

import ncf


def test_the_recipes_short_forms_mean_what_they_mean_there():
    args = ncf.parse_args(["--data", "d", "-b1", "0.3", "-b2", "0.6", "-s", "5", "-t", "0.9", "-b", "16384", "-l",
                           "0.002", "-k", "5", "-n", "3", "-f", "8", "-e", "2", "--grads_accumulated", "2",
                           "--opt_level", "O2", "--local_rank", "0", "--checkpoint-path", "m.pth", "--mode", "test"])
    assert (args.beta1, args.beta2, args.seed, args.threshold, args.batch_size) == (0.3, 0.6, 5, 0.9, 16384)
    assert (args.learning_rate, args.topk, args.negative_samples, args.factors, args.epochs) == (0.002, 5, 3, 8, 2)
    assert (args.grads_accumulated, args.opt_level, args.load_checkpoint_path, args.mode) == (2, "O2", "m.pth", "test")
    assert ncf.parse_args(["-b16384"]).batch_size == 16384  # -b with its value attached is still the batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_cache(tmp_path_factory.mktemp("recipe"))


def test_an_empty_checkpoint_dir_saves_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "logs" / "log.json"
    ncf.main(["--data", str(tiny), "-e", "1", "--checkpoint_dir", "", "--log_path", str(log), *TINY_MODEL])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["log.json", "logs"]
    out = capsys.readouterr().out
    assert "model neumf: " in out and " parameters" in out


@pytest.mark.parametrize("flags, words", [
    (["--resume"], "--checkpoint_dir is ''"),
    (["--mode", "test"], "needs --load_checkpoint_path"),
])
def test_an_empty_checkpoint_dir_with_nothing_to_read_is_one_line(tiny, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_:
        ncf.main(["--data", str(tiny), "-e", "1", "--checkpoint_dir", "", *TINY_MODEL, *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_the_log_carries_the_recipes_keys_with_its_meanings(tiny, tmp_path):
    log = tmp_path / "log.json"
    ncf.main(["--data", str(tiny), "-e", "2", "--checkpoint_dir", str(tmp_path / "ck"), "--log_path", str(log),
              *TINY_MODEL])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    (summary,) = [r for r in records if r["event"] == "summary"]
    for record in epochs:
        assert record["step"] == [record["epoch"] - 1]  # the recipe counts epochs from 0
        assert 0 < record["mrr"] <= record["ndcg"] <= record["hr"]  # MRR@k: 1/(rank+1) <= 1/log2(rank+2)
        assert (record["hr@10"], record["train_loss"]) == (record["hr"], record["loss"])
        assert (record["train_epoch_time"], record["validation_epoch_time"]) == (record["train_time_s"],
                                                                                 record["eval_time_s"])
    best = max(epochs, key=lambda r: r["hr"])
    assert summary["best_accuracy"] == best["hr"] and summary["best_epoch"] == best["epoch"]
    assert summary["mean_train_throughput"] == pytest.approx(sum(r["train_throughput"] for r in epochs) / 2)
    assert summary["mean_eval_throughput"] == pytest.approx(sum(r["eval_throughput"] for r in epochs) / 2)
    assert 0 < summary["time_to_best_model"] <= summary["time_to_target"] == summary["run_time_s"]
    assert summary["time_to_target_s"] is None  # this project's own key: the threshold 1.0 was not reached
    steps = math.ceil(best["train_throughput"] * best["train_time_s"] / 4096)
    assert steps >= 1
