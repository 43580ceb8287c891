"""A tiny synthetic dataset and a tiny trained checkpoint, shared by the end-to-end tests.

300 users x 200 items, ~30 interactions each, 50 test negatives. convert.py and ncf.py run
in-process through their main(argv) (the code their command lines run): on a busy 2-core machine a
fresh interpreter spends seconds importing torch, which the tests that check the command lines
themselves already pay for.
"""
import subprocess
import sys
from pathlib import Path

import convert
import ncf
import synthetic

ROOT = Path(__file__).resolve().parent.parent
# A small model and batch: one epoch of the tiny dataset is ~45k samples.
TINY_MODEL = ["--factors", "8", "--layers", "32", "16", "8", "-b", "4096", "--opt_level", "O0", "--no_progress"]


def run(*args):
    """Run a script of the repository in a fresh interpreter; raise with its output when it fails."""
    result = subprocess.run([sys.executable, str(ROOT / args[0]), *map(str, args[1:])], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result


def make_cache(folder, users=300, items=200, seed=0):
    """Write a tiny ratings.csv and convert it; returns the cache folder."""
    folder = Path(folder)
    csv = folder / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=users, items=items, interactions_per_user_mean=30, seed=seed)
    cache = folder / "cache"
    convert.main(["--path", str(csv), "--output", str(cache), "--negatives", "50", "--min_ratings", "20",
                  "--no_progress"])
    return cache


def train(cache, checkpoint_dir, epochs=2, *extra):
    """Train the tiny model; returns the path of the best-epoch checkpoint."""
    ncf.main(["--data", str(cache), "-e", str(epochs), "--checkpoint_dir", str(checkpoint_dir), *TINY_MODEL,
              *map(str, extra)])
    return Path(checkpoint_dir) / "model.pth"
