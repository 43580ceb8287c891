"""What the tests share besides fixtures: run a command line of the project and check its one-line user-error
contract, make the synthetic datasets and train on them, run ncf.py in-process. Tests import these by name
(`from helpers import train`); conftest.py holds the fixtures only, built from these helpers.

Two sizes of data: `make_synthetic_cache` (799 users, converted by the command line, for end-to-end
runs) and `make_tiny_cache` (300 users x 200 items, converted in-process: on a busy 2-core machine a fresh
interpreter spends seconds importing torch, which the tests of the command lines already pay for).

The project's modules are imported inside the functions: conftest.py puts the repository on sys.path first.
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# model.pth written at commit 3460a33 by `ncf.py -e 3 --factors 8 --layers 32 16 8 -b 4096 --opt_level O0` on
# make_tiny_cache's data (its best epoch, 1): a checkpoint from before the restructuring, with the model only.
OLD_CHECKPOINT = ROOT / "tests" / "data" / "neumf_before_restructuring.pth"


def load_benchmark(name):
    """benchmarks/NAME.py as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- command lines in a fresh interpreter ---------------------------------------------------------------------


def run(args, env=None, cwd=ROOT, timeout=300):
    """Run `args` (a python script of the repo when args[0] ends in .py) and capture text output."""
    args = [str(a) for a in args]
    if args[0].endswith(".py"):
        args = [sys.executable, str(ROOT / args[0]), *args[1:]]
    elif args[0].endswith(".sh"):
        args[0] = str(ROOT / args[0])
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(args, check=False, env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def run_script(*args):
    """Run a script of the repository in a fresh interpreter; raise with its output when it fails."""
    result = run(list(args))
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def assert_user_error(result, *words):
    """Exit status 2, exactly one stderr line mentioning every word, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# A small model and batch that learn the synthetic dataset in a few seconds per run.
TINY_TRAIN = ["-f", "16", "--layers", "64", "32", "16", "-b", "2048", "-l", "0.01", "--no_progress"]


def make_synthetic_cache(folder, users=799, items=400, per_user=30, seed=0, negatives=100):
    """Synthetic ratings converted into a cache; 799 users so two ranks get unequal shares."""
    import synthetic

    folder = Path(folder)
    csv = folder / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=users, items=items, interactions_per_user_mean=per_user, seed=seed)
    # --seed 0: the negatives the tests' figures were measured with (convert's default is the recipe's 1).
    result = run(["convert.py", "--path", csv, "--output", folder / "cache", "--negatives", negatives,
                  "--seed", "0", "--no_progress"])
    assert result.returncode == 0, result.stderr
    return folder / "cache"


def train(cache, workdir, *extra, name="run", env=None):
    """Run ncf.py training into workdir/name/; returns (result, log path, checkpoint dir)."""
    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.json"
    args = ["ncf.py", "--data", cache, "--checkpoint_dir", out / "ck", "--log_path", log, *TINY_TRAIN, *extra]
    result = run(args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, log, out / "ck"


def read_log(path):
    from logger import read_log as read

    return read(path)


def epochs_of(log_path):
    return [r for r in read_log(log_path) if r["event"] == "epoch"]


def event_of(log_path, event):
    (record,) = [r for r in read_log(log_path) if r["event"] == event]
    return record


# ---- the tiny dataset, in-process -----------------------------------------------------------------------------


def make_tiny_cache(folder, users=300, items=200, seed=0, validation=False):
    """300 users x 200 items, ~30 interactions each, 50 test negatives, converted in-process (with a
    validation split when asked)."""
    import convert
    import synthetic

    folder = Path(folder)
    csv = folder / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=users, items=items, interactions_per_user_mean=30, seed=seed)
    cache = folder / "cache"
    convert.main(["--path", str(csv), "--output", str(cache), "--negatives", "50", "--min_ratings", "20",
                  "--seed", "0", "--no_progress", *(["--validation"] if validation else [])])
    return cache


# The tiny cache's model: factors 8, layers 32 16 8, batch 2048 (one epoch is ~45k samples: 22 steps, above the
# 20 below which ncf.py warns that an epoch is too few steps).
TINY_MODEL = ["--factors", "8", "--layers", "32", "16", "8", "-b", "2048", "--opt_level", "O0", "--no_progress"]


def train_tiny(cache, checkpoint_dir, epochs=2, *extra):
    """Train the tiny model in-process (ncf.main); returns the path of the best-epoch checkpoint."""
    import ncf

    ncf.main(["--data", str(cache), "-e", str(epochs), "--checkpoint_dir", str(checkpoint_dir), *TINY_MODEL,
              *map(str, extra)])
    return Path(checkpoint_dir) / "model.pth"


# ---- ncf.py in-process: its main(argv), the code its command line runs ----------------------------------------


def run_main(main, capsys, *argv, record_warnings=True):
    """(exit status, stdout, stderr) of an entrypoint's main(argv) run in-process; with `record_warnings`,
    warnings join stderr as the command line prints them (else they go where the code sends them)."""
    with warnings.catch_warnings(record=record_warnings) as caught:
        if record_warnings:
            warnings.simplefilter("always")
        try:
            main([str(a) for a in argv])
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    out, err = capsys.readouterr()
    printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught or ())
    return status, out, printed + err


def run_ncf(capsys, *argv):
    """run_main of ncf.py."""
    import ncf

    return run_main(ncf.main, capsys, *argv)


def one_line(err, status, expected_status, *words):
    """run_ncf's twin of assert_user_error: the expected exit status, one stderr line with every word, no
    traceback."""
    lines = err.strip().splitlines()
    assert status == expected_status, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def snapshot(folder):
    """The user's files and their checksums (the run's own lock file aside)."""
    from cli import LOCK_FILE

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != LOCK_FILE}


def copy_run(checkpoint_dir, tmp_path):
    """A copy of a run's checkpoint folder (model.pth, last.pth) to write into: tmp_path/ck."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint_dir, ck)
    return ck


def sigterm_in_epoch_1(monkeypatch):
    """SIGTERM to this process while ncf.py's training ends its first epoch (as a scheduler sends it)."""
    import signal

    import ncf

    real_update = ncf.update_progress

    def update(state, record, epoch, *args):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_update(state, record, epoch, *args)

    monkeypatch.setattr(ncf, "update_progress", update)
