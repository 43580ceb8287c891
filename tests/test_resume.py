"""--resume: a resumed run equals the uninterrupted one; a flag changed on resume is applied and
recorded, or refused in one line; a last.pth that cannot be trusted (another dataset, a model only, edited
values) is refused, changing nothing; a loss scale is restored only from a saved one.

The end-to-end tests (marked slow) run the command line on the synthetic dataset; the others run ncf.py
in-process (its main(argv)) on the tiny dataset, most resuming a copy of trained_tiny's two-epoch run.
"""
import shutil

import pytest
import torch
from helpers import (
    OLD_CHECKPOINT,
    TINY_MODEL,
    copy_run,
    epochs_of,
    event_of,
    one_line,
    read_log,
    run_ncf,
    snapshot,
    train,
)

import checkpoint
import ncf
from cli import UserError
from dataloading import load_cache

# -- the command line: a resumed run is the uninterrupted one -------------------------------------------------------


def figures(log):
    return [(r["epoch"], r["loss"], r["hr"], r["ndcg"]) for r in epochs_of(log)]


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(synthetic_cache, tmp_path):
    # Dropout stays on (0.5): the resumed run must also continue the dropout random streams.
    _, full_log, full_ck = train(synthetic_cache, tmp_path, "-e", "4", "--opt_level", "O0", name="full")
    _, part_log, part_ck = train(synthetic_cache, tmp_path, "-e", "2", "--opt_level", "O0", name="part")
    result, _, _ = train(synthetic_cache, tmp_path, "-e", "4", "--opt_level", "O0", "--resume", name="part")
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    assert figures(part_log) == figures(full_log)
    assert len(figures(full_log)) == 4
    assert_same_weights(full_ck / "last.pth", part_ck / "last.pth")
    assert_same_weights(full_ck / "model.pth", part_ck / "model.pth")
    full_summary = event_of(full_log, "summary")
    resumed_summary = [r for r in read_log(part_log) if r["event"] == "summary"][-1]
    best = ("best_hr", "best_ndcg", "best_epoch")
    assert [resumed_summary[key] for key in best] == [full_summary[key] for key in best]


@pytest.mark.slow
def test_last_checkpoint_holds_what_resuming_needs(synthetic_cache, tmp_path):
    _, _, ck = train(synthetic_cache, tmp_path, "-e", "1", "--opt_level", "O0")
    last = torch.load(ck / "last.pth", weights_only=True)
    assert {"model", "config", "optimizer", "scaler", "state", "rng", "args", "epoch"} <= last.keys()
    assert last["epoch"] == last["state"]["epoch"] == 1
    assert last["state"]["best_hr"] == last["hr"]
    assert len(last["optimizer"]["state"]) == len(last["model"])
    assert isinstance(last["rng"][0]["cpu"], torch.Tensor)


@pytest.mark.slow
def test_resume_with_other_flags_warns_which_value_wins(synthetic_cache, tmp_path):
    train(synthetic_cache, tmp_path, "-e", "1", "--opt_level", "O0")
    result, log, _ = train(synthetic_cache, tmp_path, "-e", "2", "--opt_level", "O0", "--resume", "-l", "0.002")
    assert "--learning_rate is 0.002 here but 0.01 in last.pth; this command line's value is applied" in result.stderr
    assert [r["epoch"] for r in epochs_of(log)] == [1, 2]


@pytest.mark.slow
def test_resume_without_last_checkpoint_is_a_clear_error(synthetic_cache, tmp_path, run_cli, assert_user_error):
    result = run_cli(["ncf.py", "--data", synthetic_cache, "--checkpoint_dir", tmp_path / "empty", "--resume"])
    assert_user_error(result, "--resume", "last.pth does not exist")


# -- a flag changed on resume is applied and recorded, or refused (issue 20.1) --------------------------------------


def resumed_last(ck, cache_dir):
    return checkpoint.load_checkpoint(str(ck / "last.pth"), load_cache(str(cache_dir)), resume=True)


def test_resume_applies_a_new_learning_rate_and_records_it(tiny_cache, trained_tiny, tmp_path, capsys):
    ck = copy_run(trained_tiny, tmp_path)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume",
                             "-l", "0.002", "--beta1", "0.5", "--weight_decay", "0.01")
    assert status == 0, err
    assert "--learning_rate is 0.002 here but 0.0045 in last.pth; this command line's value is applied" in err
    last = resumed_last(ck, tiny_cache)
    (group,) = last["optimizer"]["param_groups"]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.002, (0.5, 0.5), 0.01)
    assert group.get("decoupled_weight_decay", True)
    assert (last["args"]["learning_rate"], last["args"]["beta1"]) == (0.002, 0.5)


def test_resume_continues_with_last_pth_flags_not_given(tiny_cache, trained_tiny, tmp_path, capsys):
    """A resume that names only the data, the folder and the epochs continues the run as it was: TINY_MODEL's
    batch, precision and shape, not ncf.py's defaults (a 2^20 batch in bf16)."""
    ck = copy_run(trained_tiny, tmp_path)
    status, out, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume",
                               "--no_progress")
    assert status == 0 and "warning" not in err, err
    assert "global batch 2,048" in out and "(O0)" in out
    last = resumed_last(ck, tiny_cache)
    assert (last["args"]["batch_size"], last["args"]["opt_level"], last["args"]["factors"]) == (2048, "O0", 8)


@pytest.mark.parametrize("flags, words", [
    (["--factors", "16"], "--factors is 16 here but 8"),
    (["-k", "5"], "--topk is 5 here but 10"),
])
def test_resume_refuses_a_change_it_cannot_apply(tiny_cache, trained_tiny, tmp_path, capsys, flags, words):
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume", *flags)
    one_line(err, status, 2, words, "cannot change")
    assert snapshot(ck) == before


def test_a_resume_with_another_batch_keeps_the_schedule_in_epochs(tiny_cache, tmp_path, capsys):
    """Cosine decay to 0 at the last epoch: with -b halved on resume, last.pth's step count (in the old
    batch's steps) must not be read as the new batch's, or the last epoch ends at half the rate."""
    ck = tmp_path / "ck"
    run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL, "--lr_schedule", "cosine")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "2", "--checkpoint_dir", ck, "--resume", "-b",
                             "1024")
    assert status == 0, err
    (group,) = torch.load(ck / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)


# -- a last.pth that cannot be trusted is refused, changing nothing -------------------------------------------------


@pytest.mark.parametrize("case", ["another dataset", "model-only last.pth"])
def test_resume_refuses_and_changes_nothing(tiny_cache, tiny_twin, trained_tiny, tmp_path, capsys, case):
    ck = copy_run(trained_tiny, tmp_path)
    if case == "model-only last.pth":
        shutil.copy(ck / "model.pth", ck / "last.pth")
    data, words = (tiny_twin, "another dataset or split") if case == "another dataset" else \
        (tiny_cache, "last.pth")
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", data, "-e", "3", "--checkpoint_dir", ck, "--resume", *TINY_MODEL)
    one_line(err, status, 2, words)
    assert snapshot(ck) == before


@pytest.mark.parametrize("edit", ["learning rate a string", "args a list", "learning rate nan", "epoch a string",
                                  "epoch negative", "a moment of the wrong shape"])
def test_an_edited_last_pth_is_one_line_on_resume(tiny_cache, trained_tiny, tmp_path, capsys, edit):
    """Each refused in one line, changing nothing; the last two were a ZeroDivisionError and a crash of the fused
    Adam kernel (hostile pass LE_epoch_neg, LE_opt_shape)."""
    ck = copy_run(trained_tiny, tmp_path)
    last = torch.load(ck / "last.pth", weights_only=True)
    words = "no run can have"
    if edit == "args a list":
        last["args"] = [1, 2]
    elif edit == "epoch a string":
        last["state"]["epoch"] = "x"
    elif edit == "epoch negative":
        last["state"]["epoch"] = -5
    elif edit == "a moment of the wrong shape":
        last["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 3)
        words = "optimizer state"
    else:
        last["args"]["learning_rate"] = "abc" if edit == "learning rate a string" else float("nan")
    torch.save(last, ck / "last.pth")
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume")
    one_line(err, status, 2, words)
    assert snapshot(ck) == before


def test_a_model_only_checkpoint_cannot_be_resumed(loaded_tiny_cache):
    with pytest.raises(UserError, match=r"last\.pth"):
        checkpoint.load_checkpoint(str(OLD_CHECKPOINT), loaded_tiny_cache, resume=True)


# -- the loss scale: restored only from a saved one -----------------------------------------------------------------


class StubScaler:
    def __init__(self, enabled):
        self.enabled, self.loaded = enabled, None

    def is_enabled(self):
        return self.enabled

    def load_state_dict(self, state):
        self.loaded = state


def test_an_enabled_scaler_cannot_load_the_state_of_a_disabled_one():
    """Why restore_scaler exists: what every CPU, O0 or bf16 run saves breaks an fp16 resume."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved)


def test_resume_restores_the_scaler_only_from_a_saved_state():
    with pytest.warns(UserWarning, match="fresh loss scale"):
        ncf.restore_scaler(fp16 := StubScaler(enabled=True), {})
    assert fp16.loaded is None
    ncf.restore_scaler(fp16, {"scale": 1024.0})
    assert fp16.loaded == {"scale": 1024.0}
    ncf.restore_scaler(fp32 := StubScaler(enabled=False), {})  # no warning: nothing to restore
    assert fp32.loaded is None


def test_a_resume_on_other_held_out_items_is_refused_but_a_test_is_not(tiny_cache, trained_tiny, tmp_path, capsys):
    """The same ratings converted with other test negatives (convert --seed 1): last.pth's best HR so far was
    measured on the first cache's, so --resume would rank two test sets together (hostile pass X01, X04).
    Evaluating the model there is fine: it trained on the same pairs."""
    import convert

    other = tmp_path / "other"
    convert.main(["--path", str(tiny_cache.parent / "ratings.csv"), "--output", str(other), "--negatives", "50",
                  "--min_ratings", "20", "--seed", "1", "--no_progress"])
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", other, "-e", "3", "--checkpoint_dir", ck, "--resume")
    one_line(err, status, 2, "other held-out items", "resume with the cache it ran on")
    assert snapshot(ck) == before
    status, out, err = run_ncf(capsys, "--data", other, "--mode", "test", "--checkpoint_dir", ck, *TINY_MODEL)
    assert status == 0 and "HR@10" in out, err


def test_a_resume_with_no_epoch_left_to_train_says_so(tiny_cache, trained_tiny, tmp_path, capsys):
    """last.pth is at epoch 2: -e 1 (or 2) trains nothing, which was a silent exit 0 (hostile pass R06)."""
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, "--resume")
    one_line(err, status, 2, "at epoch 2", "-e N with N > 2")
    assert snapshot(ck) == before
