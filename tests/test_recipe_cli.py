"""A recipe user's command lines and log readers work unchanged (issue 24): NVIDIA's flags and short forms
mean what they mean there, --checkpoint_dir '' saves nothing, the JSON log carries the recipe's keys."""
import json
import math
import re
import socket
import sys

import pytest
from helpers import ROOT, TINY_MODEL, run

import cli
import ncf


def test_the_recipes_short_forms_mean_what_they_mean_there():
    args = ncf.parse_args(["--data", "d", "-b1", "0.3", "-b2", "0.6", "-s", "5", "-t", "0.9", "-b", "16384", "-l",
                           "0.002", "-k", "5", "-n", "3", "-f", "8", "-e", "2", "--grads_accumulated", "2",
                           "--opt_level", "O2", "--local_rank", "0", "--checkpoint-path", "m.pth", "--mode", "test"])
    assert (args.beta1, args.beta2, args.seed, args.threshold, args.batch_size) == (0.3, 0.6, 5, 0.9, 16384)
    assert (args.learning_rate, args.topk, args.negative_samples, args.factors, args.epochs) == (0.002, 5, 3, 8, 2)
    assert (args.grads_accumulated, args.opt_level, args.load_checkpoint_path, args.mode) == (2, "O2", "m.pth", "test")
    assert ncf.parse_args(["-b16384"]).batch_size == 16384  # -b with its value attached is still the batch


def test_an_empty_checkpoint_dir_saves_nothing(tiny_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "logs" / "log.json"
    ncf.main(["--data", str(tiny_cache), "-e", "1", "--checkpoint_dir", "", "--log_path", str(log), *TINY_MODEL])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["log.json", "logs"]
    out = capsys.readouterr().out
    assert "model neumf: " in out and " parameters" in out


@pytest.mark.parametrize("flags, words", [
    (["--resume"], "--checkpoint_dir is ''"),
    (["--mode", "test"], "needs --load_checkpoint_path"),
])
def test_an_empty_checkpoint_dir_with_nothing_to_read_is_one_line(tiny_cache, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_:
        ncf.main(["--data", str(tiny_cache), "-e", "1", "--checkpoint_dir", "", *TINY_MODEL, *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_the_log_carries_the_recipes_keys_with_its_meanings(tiny_cache, tmp_path):
    log = tmp_path / "log.json"
    ncf.main(["--data", str(tiny_cache), "-e", "2", "--checkpoint_dir", str(tmp_path / "ck"), "--log_path", str(log),
              *TINY_MODEL])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    epochs = [r for r in records if r["event"] == "epoch"]
    (summary,) = [r for r in records if r["event"] == "summary"]
    for record in epochs:
        assert record["step"] == [record["epoch"] - 1]  # the recipe counts epochs from 0
        assert 0 < record["mrr"] <= record["ndcg"] <= record["hr"]  # MRR@k: 1/(rank+1) <= 1/log2(rank+2)
        assert (record["hr@10"], record["train_loss"]) == (record["hr"], record["loss"])
        assert record["validation_loss"] == record["eval_loss"] > 0  # its meaning: tests/test_nvidia_checkpoint.py
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_line(stdout):
    """(global batch, per rank, micro-batch, steps per epoch) from ncf.py's set-up lines."""
    match = re.search(r"global batch ([\d,]+) \| per rank ([\d,]+) \| micro-batch ([\d,]+) \| steps per epoch ([\d,]+)",
                      stdout)
    assert match, stdout
    return tuple(int(group.replace(",", "")) for group in match.groups())


@pytest.mark.slow
def test_the_command_lines_of_nvidias_readme_run_with_its_meaning(tmp_path):
    """NVIDIA's README, on tiny_cache data: convert as prepare_dataset.sh calls it, training through
    torch.distributed.launch (2 processes) and in one process with --grads_accumulated 2, with the recipe's
    short forms, then `--mode test --checkpoint-path` on 2 processes. Each is accepted, and each step takes
    what the recipe's flags say (-b B over the ranks; --grads_accumulated G: a step of G batches of B)."""
    import synthetic

    csv = tmp_path / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=300, items=200, interactions_per_user_mean=30, seed=0)
    converted = run(["convert.py", "--path", csv, "--output", tmp_path / "cache"])  # prepare_dataset.sh's line
    assert converted.returncode == 0, converted.stderr
    train_pairs = int(re.search(r"([\d,]+) train pairs", converted.stdout)[1].replace(",", ""))
    samples = train_pairs * (1 + 4)  # -n 4
    launch = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_port"]
    recipe = ["--data", tmp_path / "cache", "-e", "1", "-b", "8192", "-l", "0.0045", "-b1", "0.25", "-b2", "0.5",
              "--eps", "1e-8", "-f", "8", "--layers", "32", "16", "8", "-n", "4", "-t", "1.0", "-s", "1",
              "--no_progress"]

    two = run([*launch, free_port(), ROOT / "ncf.py", *recipe, "--checkpoint_dir", tmp_path / "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert setup_line(two.stdout) == (8192, 4096, 4096, samples // 8192 + (samples % 8192 >= 2))

    one = run(["ncf.py", *recipe, "--grads_accumulated", "2", "--checkpoint_dir", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert setup_line(one.stdout) == (16384, 16384, 8192, samples // 16384 + (samples % 16384 >= 2))

    hr = re.findall(r"epoch 1 \|.*? HR@10 ([\d.]+)", two.stdout)
    tested = run([*launch, free_port(), ROOT / "ncf.py", "--data", tmp_path / "cache", "--mode", "test",
                  "--checkpoint-path", tmp_path / "two" / "model.pth"])
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "world size 2" in tested.stdout and f"HR@10 {hr[0]}" in tested.stdout, (hr, tested.stdout)


def test_grads_accumulated_multiplies_the_step_as_the_recipes_does():
    """The recipe's meaning by default: a step accumulates G batches of -b; --accumulate split keeps -b the step."""
    recipe = ncf.parse_args(["-b", "1000", "--grads_accumulated", "3"])
    split = ncf.parse_args(["-b", "3000", "--grads_accumulated", "3", "--accumulate", "split"])
    assert (ncf.step_batch(recipe), ncf.step_batch(split)) == (3000, 3000)
    ncf.validate_args(recipe)  # every micro-batch is a whole -b: no divisibility by G needed
    with pytest.raises(cli.UserError, match=r"--batch_size 1000 is not divisible by world size 3 .* multiple of 3"):
        ncf.validate_args(ncf.parse_args(["-b", "1000"]), world_size=3)
    with pytest.raises(cli.UserError, match=r"--batch_size 1000 is not divisible by --grads_accumulated 3"):
        ncf.validate_args(ncf.parse_args(["-b", "1000", "--grads_accumulated", "3", "--accumulate", "split"]))


def test_a_last_pth_from_before_the_recipes_accumulation_resumes_with_its_own():
    """A last.pth without 'accumulate' was trained with -b split into G: a resume keeps that step unless told."""
    saved = vars(ncf.parse_args(["-b", "4096", "--grads_accumulated", "2"]))
    del saved["accumulate"]
    args = ncf.parse_args(["--resume"])
    resumed = ncf.resolved_resume_args(args, saved, given={"resume"})
    assert (resumed.accumulate, ncf.step_batch(resumed)) == ("split", 4096)
    told = ncf.parse_args(["--resume", "--accumulate", "recipe"])
    with pytest.warns(UserWarning, match="--accumulate is recipe here but split in last.pth"):
        assert ncf.step_batch(ncf.resolved_resume_args(told, saved, given={"resume", "accumulate"})) == 8192
