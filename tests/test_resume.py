"""--resume continues a stopped run exactly where it left off (spec §6.5)."""
import pytest
import torch
from conftest import epochs_of, event_of, read_log, train

pytestmark = pytest.mark.slow


def figures(log):
    return [(r["epoch"], r["loss"], r["hr"], r["ndcg"]) for r in epochs_of(log)]


def assert_same_weights(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_resumed_run_equals_uninterrupted_run(tiny_cache, tmp_path):
    # Dropout stays on (0.5): the resumed run must also continue the dropout random streams.
    _, full_log, full_ck = train(tiny_cache, tmp_path, "-e", "4", "--opt_level", "O0", name="full")
    _, part_log, part_ck = train(tiny_cache, tmp_path, "-e", "2", "--opt_level", "O0", name="part")
    result, _, _ = train(tiny_cache, tmp_path, "-e", "4", "--opt_level", "O0", "--resume", name="part")
    assert "resumed from" in result.stdout and "after epoch 2" in result.stdout
    assert figures(part_log) == figures(full_log)
    assert len(figures(full_log)) == 4
    assert_same_weights(full_ck / "last.pth", part_ck / "last.pth")
    assert_same_weights(full_ck / "model.pth", part_ck / "model.pth")
    full_summary = event_of(full_log, "summary")
    resumed_summary = [r for r in read_log(part_log) if r["event"] == "summary"][-1]
    best = ("best_hr", "best_ndcg", "best_epoch")
    assert [resumed_summary[key] for key in best] == [full_summary[key] for key in best]


def test_last_checkpoint_holds_what_resuming_needs(tiny_cache, tmp_path):
    _, _, ck = train(tiny_cache, tmp_path, "-e", "1", "--opt_level", "O0")
    last = torch.load(ck / "last.pth", weights_only=True)
    assert {"model", "config", "optimizer", "scaler", "state", "rng", "args", "epoch"} <= last.keys()
    assert last["epoch"] == last["state"]["epoch"] == 1
    assert last["state"]["best_hr"] == last["hr"]
    assert len(last["optimizer"]["state"]) == len(last["model"])
    assert isinstance(last["rng"][0]["cpu"], torch.Tensor)


def test_resume_with_other_flags_warns_which_value_wins(tiny_cache, tmp_path):
    train(tiny_cache, tmp_path, "-e", "1", "--opt_level", "O0")
    result, log, _ = train(tiny_cache, tmp_path, "-e", "2", "--opt_level", "O0", "--resume", "-l", "0.002")
    assert "--learning_rate is 0.002 here but 0.01 in last.pth; this command line's value is applied" in result.stderr
    assert [r["epoch"] for r in epochs_of(log)] == [1, 2]


def test_resume_without_last_checkpoint_is_a_clear_error(tiny_cache, tmp_path, run_cli, assert_user_error):
    result = run_cli(["ncf.py", "--data", tiny_cache, "--checkpoint_dir", tmp_path / "empty", "--resume"])
    assert_user_error(result, "--resume", "last.pth does not exist")
