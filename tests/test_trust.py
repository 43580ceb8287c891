"""No silent wrong answer, no lost file (spec §9), for training and evaluation: every refusal is one
stderr line with exit status 2 (1 for a failing machine, 130 for Ctrl-C) and changes nothing the user had.

ncf.py runs in-process here (its main(argv), the code its command line runs) on the tiny dataset.
"""
import hashlib
import json
import shutil
import warnings

import pytest
import torch
from conftest import TINY_MODEL, make_tiny_cache

import checkpoint
import cli
import dataloading
import ncf
from dataloading import load_cache
from devices import choose_precision
from logger import is_run_log
from neumf import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny cache, a twin of it from another source file (same shape), and a trained run."""
    root = tmp_path_factory.mktemp("trust")
    cache = make_tiny_cache(root)
    twin = root / "twin"
    shutil.copytree(cache, twin)
    meta = json.loads((twin / "metadata.json").read_text())
    meta["source_sha256"] = "f" * 64
    (twin / "metadata.json").write_text(json.dumps(meta))
    ck = root / "ck"
    ncf.main(["--data", str(cache), "-e", "2", "--checkpoint_dir", str(ck), *TINY_MODEL])
    return {"cache": cache, "twin": twin, "ck": ck}


def run_ncf(capsys, *argv):
    """(exit status, stdout, stderr) of ncf.main(argv); warnings join stderr as the command line prints them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ncf.main([str(a) for a in argv])
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    out, err = capsys.readouterr()
    printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return status, out, printed + err


def one_line(err, status, expected_status, *words):
    lines = err.strip().splitlines()
    assert status == expected_status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def snapshot(folder):
    """The user's files and their checksums (the run's own lock file aside)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ncf.LOCK_FILE}


def copy_run(world, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(world["ck"], ck)
    return ck


# -- a diverged model never scores --------------------------------------------------------------------


def test_a_model_of_nans_scores_hr_zero(world):
    cache = load_cache(str(world["cache"]))
    model = build_model({"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.0}, CPU)
    with torch.no_grad():
        model.final.weight.fill_(float("nan"))
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    data = dataloading.TestData.from_cache(cache, CPU)
    assert ncf.evaluate(model, data, 10, 1 << 20, choose_precision("O0", "auto", CPU), ctx) == \
        {"hr": 0.0, "ndcg": 0.0, "mrr": 0.0}


def test_a_diverging_run_stops_before_any_figure_or_checkpoint(world, tmp_path, capsys):
    status, out, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", tmp_path / "ck",
                               "--log_path", tmp_path / "log.json", *TINY_MODEL, "-l", "1e15")
    one_line(err, status, 2, "training diverged", "--learning_rate")
    assert not [line for line in out.splitlines() if line.startswith("epoch")]  # no epoch figures reported
    assert not (tmp_path / "ck" / "model.pth").exists()


def test_non_finite_weights_stop_training_even_with_a_finite_loss(world, tmp_path, capsys, monkeypatch):
    """A NaN that reaches the weights but not yet the loss is caught before evaluation."""
    real_epoch = ncf.train_epoch

    def poisoned(model, *args, **kwargs):
        result = real_epoch(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters())[0, 0] = float("inf")
        return result

    monkeypatch.setattr(ncf, "train_epoch", poisoned)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL)
    one_line(err, status, 2, "non-finite weights")
    assert not (tmp_path / "ck" / "model.pth").exists()


def test_mode_test_refuses_a_checkpoint_with_non_finite_weights(world, tmp_path, capsys):
    ckpt = torch.load(world["ck"] / "model.pth", weights_only=True)
    ckpt["model"]["final.bias"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pth")
    status, _, err = run_ncf(capsys, "--data", world["cache"], "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "nan.pth")
    one_line(err, status, 2, "non-finite weights")


# -- a checkpoint is used only with its dataset ---------------------------------------------------------


def test_mode_test_refuses_another_dataset_of_the_same_shape(world, capsys):
    status, _, err = run_ncf(capsys, "--data", world["twin"], "--mode", "test", "--load_checkpoint_path",
                             world["ck"] / "model.pth")
    one_line(err, status, 2, "another dataset or split")


@pytest.mark.parametrize("case", ["another dataset", "model-only last.pth"])
def test_resume_refuses_and_changes_nothing(world, tmp_path, capsys, case):
    ck = copy_run(world, tmp_path)
    if case == "model-only last.pth":
        shutil.copy(ck / "model.pth", ck / "last.pth")
    data, words = (world["twin"], "another dataset or split") if case == "another dataset" else \
        (world["cache"], "last.pth")
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", data, "-e", "3", "--checkpoint_dir", ck, "--resume", *TINY_MODEL)
    one_line(err, status, 2, words)
    assert snapshot(ck) == before


# -- one run per checkpoint folder and log ------------------------------------------------------------------


def test_a_second_run_on_a_held_checkpoint_folder_is_refused_naming_the_holder(world, tmp_path, capsys):
    ck = copy_run(world, tmp_path)
    held = cli.hold_lock(str(ck / ncf.LOCK_FILE), "--checkpoint_dir")
    try:
        before = snapshot(ck)
        status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
        one_line(err, status, 2, "--checkpoint_dir", "in use by another run", "pid")
        assert snapshot(ck) == before
    finally:
        held.close()
    assert run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)[0] == 0


def test_a_second_run_on_a_held_log_is_refused(world, tmp_path, capsys):
    log = tmp_path / "log.json"
    log.write_text('{"event": "note"}\n')
    held = cli.hold_lock(str(log), "--log_path", is_run_log, holder_note=False)
    try:
        status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                                 "--log_path", log, *TINY_MODEL)
        one_line(err, status, 2, "--log_path", "in use by another run")
        assert log.read_text() == '{"event": "note"}\n'
    finally:
        held.close()


# -- flags and the environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["-l", "nan"], ["--learning_rate", "nan"]),
    (["-l", "inf"], ["--learning_rate"]),
    (["--eps", "nan"], ["--eps"]),
    (["--beta1", "nan"], ["--beta1"]),
    (["--dropout", "nan"], ["--dropout"]),
    (["-t", "nan"], ["--threshold"]),
    (["-s", "-1"], ["--seed"]),
    (["-s", str(2**40)], ["--seed"]),
])
def test_bad_numbers_are_one_line(world, tmp_path, capsys, flags, words):
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL, *flags)
    one_line(err, status, 2, *words)
    assert not (tmp_path / "ck").exists()


def test_a_stray_rank_does_not_silence_an_error(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    status, _, err = run_ncf(capsys, "--data", tmp_path / "missing", "--checkpoint_dir", tmp_path / "ck")
    one_line(err, status, 2, "no dataset cache")


def test_a_stray_rank_does_not_stop_a_valid_run(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    status, out, _ = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL)
    assert status == 0 and "world size 1" in out
    assert (tmp_path / "ck" / "model.pth").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_world_size_without_a_rendezvous_is_one_line(world, tmp_path, capsys, monkeypatch, rank):
    """Stray launcher variables outside torchrun: one line, even when RANK says 1 (only a real launch's
    secondary ranks stay quiet, so that one error is not printed N times)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "--checkpoint_dir", tmp_path / "ck")
    one_line(err, status, 2, "WORLD_SIZE=2", "torchrun")


# -- --mode test reproduces the checkpoint's precision ------------------------------------------------------


def test_mode_test_takes_the_checkpoints_precision_unless_told_otherwise():
    args = ncf.parse_args(["--amp_dtype", "bfloat16"])  # O2 by default
    saved = {"opt_level": "O0", "amp_dtype": "auto"}
    assert ncf.checkpoint_precision(args, {"amp_dtype"}, saved, CPU).name == "fp32"
    assert ncf.checkpoint_precision(args, {"amp_dtype", "opt_level"}, saved, CPU).name == "bf16 autocast"
    bf16 = {"opt_level": "O2", "amp_dtype": "bfloat16"}
    assert ncf.checkpoint_precision(args, set(), bf16, CPU).name == "bf16 autocast"
    assert ncf.checkpoint_precision(args, set(), {"opt_level": 7}, CPU).name == "bf16 autocast"  # junk: the flags'
    assert ncf.given_flags(["--amp", "--data", "x"]) == {"opt_level", "data"}


# -- a failing disk and Ctrl-C leave the last good files --------------------------------------------------


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(world, tmp_path, capsys, monkeypatch):
    ck = copy_run(world, tmp_path)
    before = snapshot(ck)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume",
                             *TINY_MODEL)
    one_line(err, status, 1, "No space left on device", "last.pth")
    assert snapshot(ck) == before


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(world, tmp_path, capsys, monkeypatch):
    ck = copy_run(world, tmp_path)
    before = snapshot(ck)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ncf, "train_epoch", interrupted)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume",
                             *TINY_MODEL)
    one_line(err, status, 130, "interrupted")
    assert snapshot(ck) == before
    ckpt = checkpoint.load_checkpoint(str(ck / "last.pth"), load_cache(str(world["cache"])), resume=True)
    assert ckpt["state"]["epoch"] == 2


# -- a resume does what it prints and records (issue 20.1) -------------------------------------------------


def resumed_last(ck, world):
    return checkpoint.load_checkpoint(str(ck / "last.pth"), load_cache(str(world["cache"])), resume=True)


def test_resume_applies_a_new_learning_rate_and_records_it(world, tmp_path, capsys):
    ck = copy_run(world, tmp_path)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume",
                             "-l", "0.002", "--beta1", "0.5", "--weight_decay", "0.01")
    assert status == 0, err
    assert "--learning_rate is 0.002 here but 0.0045 in last.pth; this command line's value is applied" in err
    last = resumed_last(ck, world)
    (group,) = last["optimizer"]["param_groups"]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.002, (0.5, 0.5), 0.01)
    assert group.get("decoupled_weight_decay", True)
    assert (last["args"]["learning_rate"], last["args"]["beta1"]) == (0.002, 0.5)


def test_resume_continues_with_last_pth_flags_not_given(world, tmp_path, capsys):
    """A resume that names only the data, the folder and the epochs continues the run as it was: TINY_MODEL's
    batch, precision and shape, not ncf.py's defaults (a 2^20 batch in bf16)."""
    ck = copy_run(world, tmp_path)
    status, out, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume",
                               "--no_progress")
    assert status == 0 and "warning" not in err, err
    assert "global batch 2,048" in out and "(O0)" in out
    last = resumed_last(ck, world)
    assert (last["args"]["batch_size"], last["args"]["opt_level"], last["args"]["factors"]) == (2048, "O0", 8)


@pytest.mark.parametrize("flags, words", [
    (["--factors", "16"], "--factors is 16 here but 8"),
    (["-k", "5"], "--topk is 5 here but 10"),
])
def test_resume_refuses_a_change_it_cannot_apply(world, tmp_path, capsys, flags, words):
    ck = copy_run(world, tmp_path)
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume", *flags)
    one_line(err, status, 2, words, "cannot change")
    assert snapshot(ck) == before


@pytest.mark.parametrize("start", [["--resume"], ["--load_checkpoint_path", "MODEL"]])
def test_pretrained_branches_with_another_start_are_refused(world, tmp_path, capsys, start):
    ck = copy_run(world, tmp_path)
    before = snapshot(ck)
    start = [str(ck / "model.pth") if flag == "MODEL" else flag for flag in start]
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, *start,
                             "--init_gmf", ck / "model.pth", "--init_mlp", ck / "model.pth")
    one_line(err, status, 2, "--init_gmf", "pass only one")
    assert snapshot(ck) == before


# -- a checkpoint is used only with its split (issue 20.2) --------------------------------------------------


@pytest.fixture(scope="module")
def split_twin(world, tmp_path_factory):
    """The tiny ratings converted with --validation: same source, shape and settings, another split."""
    from conftest import make_tiny_cache

    return make_tiny_cache(tmp_path_factory.mktemp("split"), validation=True)


@pytest.mark.parametrize("use", ["--mode test", "--resume", "--load_checkpoint_path", "--init_gmf"])
def test_a_checkpoint_trained_without_the_validation_split_is_refused_on_it(world, split_twin, tmp_path, capsys, use):
    ck = copy_run(world, tmp_path)
    model = ck / "model.pth"
    before = snapshot(ck)
    argv = {"--mode test": ["--mode", "test", "--load_checkpoint_path", model],
            "--resume": ["--resume", "-e", "3"],
            "--load_checkpoint_path": ["--load_checkpoint_path", model],
            "--init_gmf": ["--init_gmf", model, "--init_mlp", model]}[use]
    status, _, err = run_ncf(capsys, "--data", split_twin, "--checkpoint_dir", ck, *TINY_MODEL, *argv)
    one_line(err, status, 2, "without a validation split")
    assert snapshot(ck) == before


# -- files that ncf.py did not write are never replaced (issue 20.7) ----------------------------------------


@pytest.mark.parametrize("name", ["model.pth", "last.pth", ".lock"])
def test_a_foreign_file_in_the_checkpoint_folder_is_never_replaced(world, tmp_path, capsys, name):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / name).write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    one_line(err, status, 2, name, "not replaced" if name != ".lock" else "not taken as a lock")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_a_foreign_log_is_never_appended_to(world, tmp_path, capsys):
    log = tmp_path / "notes.txt"
    log.write_text("my notes\n")
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             "--log_path", log, *TINY_MODEL)
    one_line(err, status, 2, "--log_path", "not replaced")
    assert log.read_text() == "my notes\n" and not (tmp_path / "ck").exists()


def test_a_fresh_run_over_a_previous_one_says_it_replaces_it(world, tmp_path, capsys):
    ck = copy_run(world, tmp_path)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    assert status == 0 and "holds a previous run's model.pth and last.pth, which this run replaces" in err


def test_a_run_that_fails_after_its_locks_leaves_no_folder_it_made(world, tmp_path, capsys):
    log = tmp_path / "a" / "b" / "log.json"
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             "--log_path", log, "--resume", *TINY_MODEL)
    one_line(err, status, 2, "last.pth does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, words", [
    (["-n", str(10**20)], "an epoch's samples (--negative_samples) would need"),
    (["-f", str(10**12)], "the model (--factors, --layers) would need"),
    (["--layers", "8", str(10**30)], "describe no model torch can build"),
    (["-b", str(10**400), "-l", "1e400"], "--learning_rate must be positive, got inf"),
])
def test_sizes_no_machine_can_hold_are_one_line_before_any_allocation(world, tmp_path, capsys, flags, words):
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL, *flags)
    one_line(err, status, 2, words)
    assert not (tmp_path / "ck").exists()


def test_an_epoch_of_few_steps_is_warned_with_a_batch_that_gives_enough(world, tmp_path, capsys):
    """The recipe's 2^20 batch is one optimizer step per epoch on a small dataset (issue 25.4)."""
    flags = [f for f in TINY_MODEL if f not in ("-b", "2048")]
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", "", *flags)
    assert status == 0 and "an epoch here is 1 optimizer step(s) of --batch_size 1,048,576" in err, err
    assert "try -b 2,048 (22 steps)" in err
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", "", *TINY_MODEL)
    assert status == 0 and "optimizer step" not in err, err


# -- the hostile pass's findings on these surfaces ----------------------------------------------------------


def test_a_resume_with_another_batch_keeps_the_schedule_in_epochs(world, tmp_path, capsys):
    """Cosine decay to 0 at the last epoch: with -b halved on resume, last.pth's step count (in the old
    batch's steps) must not be read as the new batch's, or the last epoch ends at half the rate."""
    ck = tmp_path / "ck"
    run_ncf(capsys, "--data", world["cache"], "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL, "--lr_schedule", "cosine")
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "2", "--checkpoint_dir", ck, "--resume", "-b",
                             "1024")
    assert status == 0, err
    (group,) = torch.load(ck / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("edit", ["learning rate a string", "args a list", "learning rate nan", "epoch a string"])
def test_an_edited_last_pth_is_one_line_on_resume(world, tmp_path, capsys, edit):
    ck = copy_run(world, tmp_path)
    last = torch.load(ck / "last.pth", weights_only=True)
    if edit == "args a list":
        last["args"] = [1, 2]
    elif edit == "epoch a string":
        last["state"]["epoch"] = "x"
    else:
        last["args"]["learning_rate"] = "abc" if edit == "learning rate a string" else float("nan")
    torch.save(last, ck / "last.pth")
    before = snapshot(ck)
    status, _, err = run_ncf(capsys, "--data", world["cache"], "-e", "3", "--checkpoint_dir", ck, "--resume")
    one_line(err, status, 2, "no run can have")
    assert snapshot(ck) == before


def test_a_checkpoint_without_a_dataset_record_says_its_split_is_unchecked(world, tmp_path, capsys):
    ckpt = torch.load(world["ck"] / "model.pth", weights_only=True)
    del ckpt["dataset"]
    torch.save(ckpt, tmp_path / "m.pth")
    status, _, err = run_ncf(capsys, "--data", world["cache"], "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "m.pth")
    assert status == 0 and "records no dataset" in err and "not its split" in err


def test_expanded_tensors_declaring_more_than_the_machine_are_refused(world, tmp_path, capsys):
    state = {"mf_user_embed.weight": torch.zeros(1, 1).expand(300, 2**28)}  # a few bytes on disk
    torch.save(state, tmp_path / "huge.pth")
    status, _, err = run_ncf(capsys, "--data", world["cache"], "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "huge.pth")
    one_line(err, status, 2, "declares weights of", "GiB")
