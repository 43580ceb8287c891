"""benchmarks/stability.py: N seeds of ncf.py, the spread of their best HR@10, a histogram."""
import json
import sys

import numpy as np
import pytest
from helpers import ROOT, TINY_MODEL, make_tiny_cache

from cli import UserError
from logger import read_log

sys.path.insert(0, str(ROOT / "benchmarks"))
import stability

pytestmark = pytest.mark.slow


def test_two_seeds_summary_and_histogram(tmp_path, run_cli):
    cache = make_tiny_cache(tmp_path, validation=True)
    output = tmp_path / "stability"
    result = run_cli(["benchmarks/stability.py", "--data", cache, "--seeds", 2, "--first_seed", 3, "--jobs", 2,
                      "--output", output, "--", "-e", 1, *TINY_MODEL])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((output / "stability.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [3, 4]
    best, valid = [], []
    for seed in (3, 4):
        records = read_log(output / f"seed_{seed}.json")
        assert records[0]["args"]["seed"] == seed
        summary = next(r for r in records if r["event"] == "summary")
        best.append(summary["best_hr"])
        valid.append(summary["best_valid_hr"])
    assert best[0] != best[1]  # different seeds, different runs
    summary = report["summary"]
    assert summary == pytest.approx({"seeds": 2, "mean": np.mean(best), "std": np.std(best, ddof=1),
                                     "min": min(best), "max": max(best), "valid_mean": np.mean(valid)})
    assert f"(chosen by validation HR@10: {valid[0]:.4f})" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == summary
    assert 0 < summary["min"] < 1
    png = (output / "stability_hr.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
    # What it wrote is provably its own, so a rerun into the same folder is accepted.
    assert report["created_by"] == stability.CREATED_BY and report["complete"]
    assert stability.is_own_output(str(output))
    stability.validate(stability.parse_args(["--data", str(cache), "--output", str(output)]))


def test_summary_without_a_validation_split_has_no_validation_mean():
    runs = [{"best_hr": 0.5, "valid_hr": None}, {"best_hr": 0.6, "valid_hr": None}]
    assert stability.summarise(runs) == pytest.approx({"seeds": 2, "mean": 0.55, "std": np.std([0.5, 0.6], ddof=1),
                                                       "min": 0.5, "max": 0.6})


def test_flags_it_sets_itself_are_user_errors(run_cli, assert_user_error, tmp_path):
    result = run_cli(["benchmarks/stability.py", "--data", tmp_path, "--output", tmp_path / "out", "--",
                      "--seed", 5])
    assert_user_error(result, "--seed", "remove it")


def test_missing_data_is_a_user_error_before_any_training(run_cli, assert_user_error, tmp_path):
    result = run_cli(["benchmarks/stability.py", "--data", tmp_path / "missing", "--output", tmp_path / "out"])
    assert_user_error(result, "--data", "prepare_dataset.sh")
    assert not (tmp_path / "out").exists()


def test_failing_seed_is_a_user_error(tmp_path, monkeypatch):
    # A stand-in for ncf.py that fails the way ncf.py reports a user error.
    (tmp_path / "ncf.py").write_text("import sys\nprint('ncf.py: error: something is wrong: fix it', "
                                     "file=sys.stderr)\nsys.exit(2)\n")
    monkeypatch.setattr(stability, "ROOT", str(tmp_path))
    args = stability.parse_args(["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--", "-e", "1"])
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"seed 7: ncf.py exited with status 2 \(ncf.py: error: something is wrong"):
        stability.train_seed(7, args, threads=1)
    assert "something is wrong" in (tmp_path / "out" / "seed_7.out").read_text()


def test_sigterm_stops_the_study_and_its_training_in_one_line(tmp_path):
    """SIGTERM (a scheduler's notice) is Ctrl-C for the commands that do not handle it themselves: one line,
    exit 130, and the ncf.py it started stops too (it went on training for 30 epochs, orphaned)."""
    import os
    import signal
    import subprocess
    import time

    cache = make_tiny_cache(tmp_path)
    out = tmp_path / "study"
    job = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stability.py"), "--data", str(cache),
                            "--seeds", "2", "--output", str(out), "--", "-e", "30", *TINY_MODEL],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "seed_1.out").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # the seed's ncf.py is importing or training
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130 and err.strip().splitlines() == ["stability.py: interrupted"], err
    time.sleep(1)
    survivors = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert [pid for pid in survivors if int(pid) != os.getpid()] == []
