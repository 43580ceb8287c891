"""No silent wrong answer, no lost file, for training and evaluation: every refusal is one
stderr line with exit status 2 (1 for a failing machine, 130 for Ctrl-C) and changes nothing the user had.

ncf.py runs in-process here (its main(argv), the code its command line runs) on the tiny dataset. A diverged
run is tested in test_divergence.py, a resumed one in test_resume.py.
"""
import pytest
import torch
from helpers import TINY_MODEL, copy_run, one_line, run_main, run_ncf, snapshot

import checkpoint
import cli
import ncf
from dataloading import load_cache
from logger import is_run_log

CPU = torch.device("cpu")


# -- a checkpoint is used only with its dataset ---------------------------------------------------------


def test_mode_test_refuses_another_dataset_of_the_same_shape(tiny_twin, trained_tiny, capsys):
    status, _, err = run_ncf(capsys, "--data", tiny_twin, "--mode", "test", "--load_checkpoint_path",
                             trained_tiny / "model.pth")
    one_line(err, status, 2, "another dataset or split")


# -- one run per checkpoint folder and log ------------------------------------------------------------------


def test_a_second_run_on_a_held_checkpoint_folder_is_refused_naming_the_holder(tiny_cache, trained_tiny,
                                                                               tmp_path, capsys):
    ck = copy_run(trained_tiny, tmp_path)
    held = cli.hold_lock(str(ck / cli.LOCK_FILE), "--checkpoint_dir")
    try:
        before = snapshot(ck)
        status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
        one_line(err, status, 2, "--checkpoint_dir", "in use by another run", "pid")
        assert snapshot(ck) == before
    finally:
        held.close()
    assert run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)[0] == 0


def test_a_second_run_on_a_held_log_is_refused(tiny_cache, tmp_path, capsys):
    log = tmp_path / "log.json"
    log.write_text('{"event": "note"}\n')
    held = cli.hold_lock(str(log), "--log_path", is_run_log, holder_note=False)
    try:
        status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
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
def test_bad_numbers_are_one_line(tiny_cache, tmp_path, capsys, flags, words):
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL, *flags)
    one_line(err, status, 2, *words)
    assert not (tmp_path / "ck").exists()


def test_a_stray_rank_does_not_silence_an_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    status, _, err = run_ncf(capsys, "--data", tmp_path / "missing", "--checkpoint_dir", tmp_path / "ck")
    one_line(err, status, 2, "no dataset cache")


def test_a_stray_rank_does_not_stop_a_valid_run(tiny_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    status, out, _ = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL)
    assert status == 0 and "world size 1" in out
    assert (tmp_path / "ck" / "model.pth").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_world_size_without_a_rendezvous_is_one_line(tiny_cache, tmp_path, capsys, monkeypatch, rank):
    """Stray launcher variables outside torchrun: one line, even when RANK says 1 (only a real launch's
    secondary ranks stay quiet, so that one error is not printed N times)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "--checkpoint_dir", tmp_path / "ck")
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


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(tiny_cache, trained_tiny,
                                                                           tmp_path, capsys, monkeypatch):
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume",
                             *TINY_MODEL)
    one_line(err, status, 1, "No space left on device", "last.pth")
    assert snapshot(ck) == before


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(tiny_cache, trained_tiny,
                                                                   tmp_path, capsys, monkeypatch):
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ncf, "train_epoch", interrupted)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume",
                             *TINY_MODEL)
    one_line(err, status, 130, "interrupted")
    assert snapshot(ck) == before
    ckpt = checkpoint.load_checkpoint(str(ck / "last.pth"), load_cache(str(tiny_cache)), resume=True)
    assert ckpt["state"]["epoch"] == 2


@pytest.mark.parametrize("start", [["--resume"], ["--load_checkpoint_path", "MODEL"]])
def test_pretrained_branches_with_another_start_are_refused(tiny_cache, trained_tiny, tmp_path, capsys, start):
    ck = copy_run(trained_tiny, tmp_path)
    before = snapshot(ck)
    start = [str(ck / "model.pth") if flag == "MODEL" else flag for flag in start]
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, *start,
                             "--init_gmf", ck / "model.pth", "--init_mlp", ck / "model.pth")
    one_line(err, status, 2, "--init_gmf", "pass only one")
    assert snapshot(ck) == before


# -- a checkpoint is used only with its split (issue 20.2) --------------------------------------------------


@pytest.mark.parametrize("use", ["--mode test", "--resume", "--load_checkpoint_path", "--init_gmf"])
def test_a_checkpoint_trained_without_the_validation_split_is_refused_on_it(trained_tiny, tiny_validation_cache,
                                                                            tmp_path, capsys, use):
    ck = copy_run(trained_tiny, tmp_path)
    model = ck / "model.pth"
    before = snapshot(ck)
    argv = {"--mode test": ["--mode", "test", "--load_checkpoint_path", model],
            "--resume": ["--resume", "-e", "3"],
            "--load_checkpoint_path": ["--load_checkpoint_path", model],
            "--init_gmf": ["--init_gmf", model, "--init_mlp", model]}[use]
    status, _, err = run_ncf(capsys, "--data", tiny_validation_cache, "--checkpoint_dir", ck, *TINY_MODEL, *argv)
    one_line(err, status, 2, "without a validation split")
    assert snapshot(ck) == before


# -- files that ncf.py did not write are never replaced (issue 20.7) ----------------------------------------


@pytest.mark.parametrize("name", ["model.pth", "last.pth", ".lock"])
def test_a_foreign_file_in_the_checkpoint_folder_is_never_replaced(tiny_cache, tmp_path, capsys, name):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / name).write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    one_line(err, status, 2, name, "not replaced" if name != ".lock" else "not taken as a lock")
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


def test_files_named_like_temporaries_are_deleted_only_with_the_projects_proof(tiny_cache, tmp_path, capsys):
    """A user's model.pth.old-2023 and last.pth.tmp-1999/ (dead 'pids') stay; a killed run's temporary, whose
    .partial proof says it is the project's, goes (hostile pass C10)."""
    ck = tmp_path / "ck"
    (ck / "last.pth.tmp-1999").mkdir(parents=True)
    (ck / "last.pth.tmp-1999" / "notes.txt").write_text("mine\n")
    (ck / "model.pth.old-2023").write_text("my backup\n")
    killed = ck / "model.pth.tmp-999999"  # no such pid: a killed writer's
    cli.claim_temporary(str(killed))
    killed.write_bytes(b"half a checkpoint")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    assert status == 0, err
    assert not killed.exists() and not (ck / "model.pth.tmp-999999.partial").exists()
    assert (ck / "last.pth.tmp-1999" / "notes.txt").read_text() == "mine\n"
    assert (ck / "model.pth.old-2023").read_text() == "my backup\n"


def test_a_users_folder_where_a_temporary_goes_is_refused_and_kept(tiny_cache, tmp_path, capsys):
    """convert's temporary folder is OUTPUT.tmp-PID: a user's folder of that name (this process's pid) is in
    the way. It is refused in one line and kept (the cleanup after the refusal deleted it)."""
    import os

    import convert

    theirs = tmp_path / f"cache.tmp-{os.getpid()}"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine\n")
    status, _, err = run_main(convert.main, capsys, "--path", tiny_cache.parent / "ratings.csv", "--output",
                              tmp_path / "cache", "--no_progress")
    one_line(err, status, 1, "in the way of a temporary", "move it away")
    assert (theirs / "notes.txt").read_text() == "mine\n" and not (tmp_path / "cache").exists()


def test_a_foreign_log_is_never_appended_to(tiny_cache, tmp_path, capsys):
    log = tmp_path / "notes.txt"
    log.write_text("my notes\n")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             "--log_path", log, *TINY_MODEL)
    one_line(err, status, 2, "--log_path", "not replaced")
    assert log.read_text() == "my notes\n" and not (tmp_path / "ck").exists()


def test_a_fresh_run_over_a_previous_one_says_it_replaces_it(tiny_cache, trained_tiny, tmp_path, capsys):
    ck = copy_run(trained_tiny, tmp_path)
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    assert status == 0 and "holds a previous run's model.pth and last.pth, which this run replaces" in err


def test_a_fresh_run_stopped_early_leaves_no_previous_last_pth_to_resume(tiny_cache, trained_tiny, tmp_path, capsys,
                                                                          monkeypatch):
    """Stopped before its first last.pth, a fresh run over a previous one must not leave that run's last.pth
    for --resume to continue beside this run's model.pth (hostile pass MIX2)."""
    ck = copy_run(trained_tiny, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ncf, "train_epoch", interrupted)
    status, _, _ = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", ck, *TINY_MODEL)
    assert status == 130 and not (ck / "last.pth").exists() and (ck / "model.pth").exists()
    monkeypatch.undo()
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "3", "--checkpoint_dir", ck, "--resume")
    one_line(err, status, 2, "last.pth does not exist")


def test_a_run_that_fails_after_its_locks_leaves_no_folder_it_made(tiny_cache, tmp_path, capsys):
    log = tmp_path / "a" / "b" / "log.json"
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             "--log_path", log, "--resume", *TINY_MODEL)
    one_line(err, status, 2, "last.pth does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, words", [
    (["-n", str(10**20)], "an epoch's samples (--negative_samples) would need"),
    (["-f", str(10**12)], "the model (--factors, --layers) would need"),
    (["--layers", "8", str(10**30)], "describe no model torch can build"),
    (["-b", str(10**400), "-l", "1e400"], "--learning_rate must be positive, got inf"),
])
def test_sizes_no_machine_can_hold_are_one_line_before_any_allocation(tiny_cache, tmp_path, capsys, flags, words):
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL, *flags)
    one_line(err, status, 2, words)
    assert not (tmp_path / "ck").exists()


def test_an_epoch_of_few_steps_is_warned_with_a_batch_that_gives_enough(tiny_cache, tmp_path, capsys):
    """The recipe's 2^20 batch is one optimizer step per epoch on a small dataset (issue 25.4)."""
    flags = [f for f in TINY_MODEL if f not in ("-b", "2048")]
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", "", *flags)
    assert status == 0 and "an epoch here is 1 optimizer step(s) of 1,048,576 samples" in err, err
    assert "try -b 2,048 (22 steps)" in err
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", "", *TINY_MODEL)
    assert status == 0 and "optimizer step" not in err, err


# -- the hostile pass's findings on these surfaces ----------------------------------------------------------


def test_a_checkpoint_without_a_dataset_record_says_its_split_is_unchecked(tiny_cache, trained_tiny,
                                                                           tmp_path, capsys):
    ckpt = torch.load(trained_tiny / "model.pth", weights_only=True)
    del ckpt["dataset"]
    torch.save(ckpt, tmp_path / "m.pth")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "m.pth")
    assert status == 0 and "records no dataset" in err and "not its split" in err


@pytest.mark.parametrize("start", [["--mode", "test", "--load_checkpoint_path"], ["-e", "1", "--load_checkpoint_path"]])
def test_a_checkpoint_without_a_dataset_record_is_refused_on_a_validation_split(tiny_validation_cache, trained_tiny,
                                                                                tmp_path, capsys, start):
    """NVIDIA's model.pth records no dataset: on a validation cache it may have trained on the validation items,
    and a run started from it would record the cache's split as its own (hostile pass NV_trainV2)."""
    ckpt = torch.load(trained_tiny / "model.pth", weights_only=True)
    del ckpt["dataset"]
    torch.save(ckpt, tmp_path / "m.pth")
    status, _, err = run_ncf(capsys, "--data", tiny_validation_cache, "--checkpoint_dir", tmp_path / "ck", *TINY_MODEL,
                             *start, tmp_path / "m.pth")
    one_line(err, status, 2, "records no dataset", "without --validation")
    assert not (tmp_path / "ck").exists()


def test_expanded_tensors_declaring_more_than_the_machine_are_refused(tiny_cache, tmp_path, capsys):
    state = {"mf_user_embed.weight": torch.zeros(1, 1).expand(300, 2**28)}  # a few bytes on disk
    torch.save(state, tmp_path / "huge.pth")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "--mode", "test", "--load_checkpoint_path",
                             tmp_path / "huge.pth")
    one_line(err, status, 2, "declares weights of", "GiB")
