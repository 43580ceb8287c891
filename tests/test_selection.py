"""Honest model selection (issue 13): the validation split, selection and early stopping on it, weight
decay and the learning-rate schedule, the paper's GMF and MLP branches and NeuMF from them, tune.py."""
import json
import math
import os
import signal
import sys
import time

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL, make_tiny_cache, sigterm_in_epoch_1

import cache_format
import convert
import ncf
from cli import UserError
from dataloading import load_cache
from logger import read_log
from neumf import NeuMF, build_model, load_pretrained

CPU = torch.device("cpu")


def train(cache, folder, *flags, epochs=3):
    """Train in-process; returns the records of the log (epochs, then the summary)."""
    log = folder / "log.json"
    ncf.main(["--data", str(cache), "-e", str(epochs), "--checkpoint_dir", str(folder / "ck"), "--log_path", str(log),
              *TINY_MODEL, *map(str, flags)])
    return read_log(log)


# -- the validation split ----------------------------------------------------------------------------------

# user, item, timestamp. User 1: items 10 (t1), 11 (t2), 12 (t3), 13 (t4), then 10 again (t5, a repeat: its
# first copy counts): test 13, validation 12, train 10, 11. User 2: two items, too few to spare one for
# validation: test 21 (t2), train 20, validation none. User 3: 30 (t1) and 31, 32 tied at t2 (file order).
RATINGS = [(1, 10, 1), (1, 11, 2), (2, 20, 1), (1, 12, 3), (3, 30, 1), (3, 31, 2), (3, 32, 2), (1, 13, 4),
           (2, 21, 2), (1, 10, 5), (3, 33, 0), (4, 40, 1), (4, 41, 2), (4, 42, 3)]


def convert_table(tmp_path, *flags, name="cache"):
    csv = tmp_path / "ratings.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in RATINGS))
    convert.main(["--path", str(csv), "--output", str(tmp_path / name), "--min_ratings", "1", "--negatives", "3",
                  "--no_progress", *flags])
    return load_cache(str(tmp_path / name))


def originals(cache, table):
    users, items = cache.user_ids.tolist(), cache.item_ids.tolist()
    return {users[u]: (items[i] if i >= 0 else None) for u, i in table.tolist()}


def test_validation_holds_out_each_users_second_to_last_item(tmp_path):
    cache = convert_table(tmp_path, "--validation")
    assert originals(cache, cache.test) == {1: 13, 2: 21, 3: 32, 4: 42}
    assert originals(cache, cache.valid) == {1: 12, 2: None, 3: 31, 4: 41}
    train = {(cache.user_ids[u].item(), cache.item_ids[i].item()) for u, i in cache.train.tolist()}
    assert train == {(1, 10), (1, 11), (2, 20), (3, 33), (3, 30), (4, 40)}
    assert cache.metadata["validation"] is True and cache.metadata["num_valid"] == 3


def test_a_validation_split_no_user_can_fill_is_refused(tmp_path):
    """Users of two items each: nobody can spare a validation item. convert says so rather than write a
    split that selection would divide by zero on; a cache like it (edited) is refused when loaded."""
    csv = tmp_path / "ratings.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{u * 10 + k},{k}\n" for u in range(1, 4)
                                                         for k in range(2)))
    argv = ["--path", str(csv), "--min_ratings", "1", "--negatives", "3", "--no_progress"]
    with pytest.raises(UserError, match=r"none of the 3 user\(s\) has the 3 distinct items"):
        convert.convert(convert.parse_args([*argv, "--output", str(tmp_path / "cache"), "--validation"]))
    assert not (tmp_path / "cache").exists()
    convert.main([*argv, "--output", str(tmp_path / "cache")])
    meta = json.loads((tmp_path / "cache" / "metadata.json").read_text())
    assert load_cache(str(tmp_path / "cache")).num_users == 3
    valid = torch.stack([torch.arange(3), torch.full((3,), -1)], 1).int()  # what an empty split would hold
    for name, tensor in (("valid_ratings.pt", valid), ("valid_negatives.pt", torch.zeros(3, 3, dtype=torch.int32))):
        torch.save(tensor, tmp_path / "cache" / name)
        meta["files"][name] = {"bytes": (tmp_path / "cache" / name).stat().st_size,
                               "sha256": cache_format.sha256_of(tmp_path / "cache" / name)}
    meta.update(validation=True, num_valid=0)
    (tmp_path / "cache" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="no user has a validation item"):
        load_cache(str(tmp_path / "cache"))


def test_validation_negatives_are_distinct_unseen_items_and_test_negatives_do_not_move(tmp_path):
    with_split = convert_table(tmp_path, "--validation")
    without = convert_table(tmp_path, name="plain")
    assert torch.equal(with_split.test_negatives, without.test_negatives)  # the recipe's protocol unchanged
    assert torch.equal(with_split.test, without.test) and without.valid is None
    seen = {}
    for u, i in [*with_split.train.tolist(), *with_split.test.tolist(), *with_split.valid.tolist()]:
        seen.setdefault(u, set()).add(i)
    for u, negatives in enumerate(with_split.valid_negatives.tolist()):
        assert len(set(negatives)) == 3 and not set(negatives) & seen[u]


# -- selection, threshold and patience on the validation figures ---------------------------------------------


def test_the_best_epoch_is_chosen_by_validation_and_reported_with_its_test_figures(tiny_validation_cache, tmp_path):
    records = train(tiny_validation_cache, tmp_path, "-l", "0.01", epochs=4)
    epochs = [r for r in records if r["event"] == "epoch"]
    (summary,) = [r for r in records if r["event"] == "summary"]
    assert all({"valid_hr", "valid_ndcg", "hr", "ndcg"} <= r.keys() for r in epochs)
    chosen = max(epochs, key=lambda r: (r["valid_hr"], -r["epoch"]))
    assert summary["best_epoch"] == chosen["epoch"] and summary["best_hr"] == chosen["hr"]
    assert summary["best_valid_hr"] == chosen["valid_hr"]
    assert summary["selected_by"] == "validation HR@10"
    ckpt = torch.load(tmp_path / "ck" / "model.pth", weights_only=True)
    assert ckpt["epoch"] == chosen["epoch"] and ckpt["hr"] == chosen["hr"]
    # Validation and test figures are not the same thing (both measured, on other items).
    assert [r["valid_hr"] for r in epochs] != [r["hr"] for r in epochs]


def test_threshold_applies_to_the_validation_figure(tiny_validation_cache, tmp_path):
    records = train(tiny_validation_cache, tmp_path, "-l", "0.01", epochs=4)
    first_valid = next(r for r in records if r["event"] == "epoch")["valid_hr"]
    records = train(tiny_validation_cache, tmp_path / "again", "-l", "0.01", "-t", first_valid, epochs=4)
    assert len([r for r in records if r["event"] == "epoch"]) == 1


def test_patience_stops_after_epochs_without_improvement(tiny_validation_cache, tmp_path, capsys):
    records = train(tiny_validation_cache, tmp_path, "-l", "1e-9", "--patience", "2", epochs=10)  # nothing improves
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert "--patience" in capsys.readouterr().out


def test_without_a_validation_split_the_recipe_selects_on_test(tmp_path):
    cache = make_tiny_cache(tmp_path)
    records = train(cache, tmp_path, epochs=2)
    (summary,) = [r for r in records if r["event"] == "summary"]
    assert summary["selected_by"] == "test HR@10" and "best_valid_hr" not in summary
    assert all("valid_hr" not in r for r in records if r["event"] == "epoch")


# -- weight decay and the schedule ---------------------------------------------------------------------------


def test_weight_decay_is_decoupled_over_whole_tables():
    torch.manual_seed(0)
    model = NeuMF(10, 8, 4, (8, 4), 0.0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, name = ncf.make_optimizer(model, 0.1, (0.25, 0.5), 1e-8, weight_decay=0.01)
    assert name.startswith("torch.optim.AdamW(")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is then 0: only the decay moves the weights
    optimizer.step()
    for a, b in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(b.detach(), a * (1 - 0.1 * 0.01), rtol=1e-6, atol=0)
    assert ncf.make_optimizer(model, 0.1, (0.25, 0.5), 1e-8)[1].startswith("torch.optim.Adam(")


def test_warmup_then_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = ncf.make_schedule(optimizer, "cosine", warmup_epochs=1, epochs=3, steps_per_epoch=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    constant = ncf.make_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "constant", 0, 3, 4)
    assert constant.get_last_lr() == [1.0]


# -- GMF and MLP alone, NeuMF from both --------------------------------------------------------------------


def test_load_pretrained_gives_the_alpha_weighted_sum_of_the_branches():
    torch.manual_seed(0)
    gmf, mlp, neumf = (NeuMF(30, 20, 4, (8, 6, 4), 0.0, model=m).eval() for m in ("gmf", "mlp", "neumf"))
    load_pretrained(neumf, gmf, mlp)
    users, items = torch.randint(0, 30, (200,)), torch.randint(0, 20, (200,))
    torch.testing.assert_close(neumf(users, items), 0.5 * gmf(users, items) + 0.5 * mlp(users, items))


@pytest.fixture(scope="module")
def branches(tiny_validation_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("branches")
    for model in ("gmf", "mlp"):
        train(tiny_validation_cache, folder / model, "--model", model, epochs=2)
    return folder


@pytest.mark.parametrize("model", ["gmf", "mlp"])
def test_a_branch_alone_trains_tests_and_resumes(tiny_validation_cache, branches, tmp_path, model, capsys):
    ckpt = torch.load(branches / model / "ck" / "model.pth", weights_only=True)
    assert ckpt["config"]["model"] == model
    summary = next(r for r in read_log(branches / model / "log.json") if r["event"] == "summary")
    assert summary["best_valid_hr"] > 0
    ncf.main(["--data", str(tiny_validation_cache), "--mode", "test", "--load_checkpoint_path",
              str(branches / model / "ck" / "model.pth"), "--log_path", str(tmp_path / "test.json")])
    (tested,) = [r for r in read_log(tmp_path / "test.json") if r["event"] == "test"]
    assert tested["hr"] == pytest.approx(ckpt["hr"], abs=1e-12)
    import shutil

    shutil.copytree(branches / model / "ck", tmp_path / "ck")
    records = train(tiny_validation_cache, tmp_path, "--model", model, "--resume", epochs=3)
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [3]


def test_neumf_starts_from_the_pretrained_branches(tiny_validation_cache, branches):
    cache = load_cache(str(tiny_validation_cache))
    args = ncf.parse_args(["--data", str(tiny_validation_cache), *TINY_MODEL, "--init_gmf",
                           str(branches / "gmf/ck/model.pth"), "--init_mlp", str(branches / "mlp/ck/model.pth")])
    model = build_model(ncf.model_config(args, cache), CPU)
    ncf.initial_weights(model, args, cache)
    import checkpoint

    gmf, _ = checkpoint.load_model(args.init_gmf, cache, CPU)
    mlp, _ = checkpoint.load_model(args.init_mlp, cache, CPU)
    users, items = torch.randint(0, cache.num_users, (500,)), torch.randint(0, cache.num_items, (500,))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(users, items), 0.5 * gmf(users, items) + 0.5 * mlp(users, items))


def test_pretrained_branches_of_another_shape_are_refused(tiny_validation_cache, branches):
    cache = load_cache(str(tiny_validation_cache))
    args = ncf.parse_args(["--data", str(tiny_validation_cache), "--factors", "16", "--layers", "32", "16", "8",
                           "--init_gmf", str(branches / "gmf/ck/model.pth"),
                           "--init_mlp", str(branches / "mlp/ck/model.pth")])
    model = build_model(ncf.model_config(args, cache), CPU)
    with pytest.raises(UserError, match=r"--init_gmf .* factors 8 .* factors 16"):
        ncf.initial_weights(model, args, cache)


@pytest.mark.parametrize("flags", [["--init_gmf", "x.pth"], ["--model", "gmf", "--init_gmf", "a", "--init_mlp", "b"]])
def test_pretraining_flags_go_together(flags):
    with pytest.raises(UserError, match="--init_gmf and --init_mlp go together"):
        ncf.validate_args(ncf.parse_args(flags))


# -- tune.py -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tune_runs_trials_and_continues_a_stopped_study(tiny_validation_cache, tmp_path, capsys):
    import tune

    out = tmp_path / "tune"
    fixed = ["--", "--factors", "8", "--layers", "32", "16", "8", "--opt_level", "O0"]
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
                                 "dropout": {"low": 0.0, "high": 0.5}, "batch_size": {"choices": [1024, 4096]}}))
    tune.main(["--data", str(tiny_validation_cache), "--trials", "2", "--epochs", "2", "--output", str(out),
               "--space", str(space), *fixed])
    first = capsys.readouterr().out
    tune.main(["--data", str(tiny_validation_cache), "--trials", "3", "--epochs", "2", "--output", str(out),
               "--space", str(space), *fixed])
    second = capsys.readouterr().out
    assert "2 trials finished, continuing to 3" in second
    import optuna

    study = optuna.load_study(study_name="ncf", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3
    best = json.loads((out / "ncf" / "best.json").read_text())
    assert best["valid_hr"] == max(t.value for t in study.trials if t.value is not None)
    assert best["command"].startswith("python ncf.py --data") and "--learning_rate" in best["command"]
    assert (out / "ncf" / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert "valid HR" in first and "test HR" in first


@pytest.fixture
def sigterm_handler_kept():
    """tune.main turns SIGTERM into KeyboardInterrupt: give the test process its own handler back."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


TUNE_FIXED = ["--space", None, "--", "--factors", "8", "--layers", "32", "16", "8", "--opt_level", "O0"]


def tune_argv(cache, out, space, trials):
    space.write_text(json.dumps({"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}))
    return ["--data", str(cache), "--trials", str(trials), "--epochs", "2", "--output", str(out),
            "--no_plots", "--space", str(space), *TUNE_FIXED[2:]]


def test_stop_request_restores_the_previous_sigterm_handler():
    before = signal.getsignal(signal.SIGTERM)
    with ncf.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_sigterm_during_the_last_epoch_stops_nothing(tiny_cache, tmp_path, monkeypatch, capsys, epochs):
    """SIGTERM in epoch 1: of 2 epochs the run stops there (130, continue with --resume); of 1 the run is
    complete, status 0 (it said "continue with --resume", which then refused: nothing was left to train)."""
    sigterm_in_epoch_1(monkeypatch)
    argv = ["--data", str(tiny_cache), "-e", str(epochs), "--checkpoint_dir", str(tmp_path / "ck"), "--no_progress",
            "--factors", "8", "--layers", "32", "16", "8"]
    if epochs == 1:
        ncf.main(argv)
        assert "SIGTERM" not in capsys.readouterr().out
    else:
        with pytest.raises(SystemExit) as stop:
            ncf.main(argv)
        assert stop.value.code == 130 and "continue with --resume" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_during_a_trial_fails_it_and_ends_the_search(tiny_validation_cache, tmp_path, monkeypatch, capsys,
                                                             sigterm_handler_kept):
    """A trial cut short by SIGTERM has the figure of fewer epochs than its flags ask: never recorded as
    complete. The search stops (exit 130), and the next command continues it."""
    import optuna

    import tune

    sigterm_in_epoch_1(monkeypatch)
    out = tmp_path / "tune"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        tune.main(tune_argv(tiny_validation_cache, out, tmp_path / "space.json", trials=3))
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [f"{os.path.basename(sys.argv[0])}: interrupted"]
    study = optuna.load_study(study_name="ncf", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    assert signal.getsignal(signal.SIGTERM) is before  # the command gave the caller's handler back


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own ask() outside optimize()
def test_a_trial_of_a_killed_search_is_failed_by_the_next_one(tiny_validation_cache, tmp_path, monkeypatch,
                                                              sigterm_handler_kept):
    import optuna

    import tune

    out = tmp_path / "tune"
    tune.main(tune_argv(tiny_validation_cache, out, tmp_path / "space.json", trials=1))  # a study as tune.py starts it
    storage = tune.make_storage(optuna, f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name="ncf", storage=storage)
    orphan = study.ask()  # what `kill -9` during a trial leaves: running, with a heartbeat that stopped
    storage.record_heartbeat(orphan._trial_id)
    monkeypatch.setattr(tune, "GRACE_S", 1)
    monkeypatch.setattr(tune, "HEARTBEAT_S", 1)
    time.sleep(2.5)
    # The failed orphan counts as finished.
    tune.main(tune_argv(tiny_validation_cache, out, tmp_path / "space.json", trials=3))
    states = [t.state for t in optuna.load_study(study_name="ncf", storage=f"sqlite:///{out / 'study.db'}").trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                      optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_a_diverging_trial_is_failed_in_one_line_and_the_search_goes_on(tiny_validation_cache, tmp_path, capsys,
                                                                        sigterm_handler_kept):
    import tune

    space = tmp_path / "space.json"
    argv = tune_argv(tiny_validation_cache, tmp_path / "tune", space, trials=3)
    space.write_text(json.dumps({"learning_rate": {"low": 1e12, "high": 1e13, "log": True}}))
    tune.main([*argv[:argv.index("--")], "--confirm_top", "0", *argv[argv.index("--"):]])
    # Trial 0 runs ncf.py's default learning rate, outside this space, and finishes; the two searched diverge.
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": training diverged")[0] for line in err] == [
        "tune.py: trial 1 failed", "tune.py: trial 2 failed"]


@pytest.mark.slow
def test_a_search_whose_every_trial_diverges_ends_in_one_line(tiny_validation_cache, tmp_path, capsys,
                                                               sigterm_handler_kept):
    import tune

    space = tmp_path / "space.json"
    argv = tune_argv(tiny_validation_cache, tmp_path / "tune", space, trials=2)
    space.write_text(json.dumps({"beta1": {"low": 0.1, "high": 0.9}}))  # the default 0.25 inside: trial 0 runs it
    with pytest.raises(SystemExit) as ended:
        tune.main([*argv, "-l", "1e12"])  # every trial diverges, trial 0 too
    assert ended.value.code == 2  # no trial finished: a UserError, after both were tried
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": training diverged")[0] for line in err[:2]] == [
        "tune.py: trial 0 failed", "tune.py: trial 1 failed"]
    assert "no trial finished" in err[2] and len(err) == 3


def test_tune_refuses_a_cache_without_validation_and_searched_flags_given_as_fixed(tmp_path):
    import tune

    cache = make_tiny_cache(tmp_path)
    with pytest.raises(SystemExit) as info:
        tune.main(["--data", str(cache), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        tune.main(["--data", str(cache), "--output", str(tmp_path / "out2"), "--", "--learning_rate", "0.1"])
    assert info.value.code == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_suggested_flags_are_ncf_flags():
    import tune

    class Fixed:
        user_attrs = {}  # noqa: RUF012  (read only)

        def suggest_categorical(self, name, choices):
            return choices[0]

        def suggest_int(self, name, low, high, log=False):
            return low

        def suggest_float(self, name, low, high, log=False):
            return low

    argv = tune.flags_of(tune.suggest(Fixed(), tune.DEFAULT_SPACE, {"batch_size", "factors", "negative_samples"}))
    args = ncf.parse_args(argv)
    assert args.layers == [32, 16, 8] and args.learning_rate == 1e-4 and args.negative_samples == 1
    assert np.isclose(args.weight_decay, 1e-3) and args.model == "neumf"
