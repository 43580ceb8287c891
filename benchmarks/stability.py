"""Training stability: train the same configuration with N seeds and report the spread of best HR@k.

    python benchmarks/stability.py --data data/cache/synthetic --seeds 5 --output runs/stability -- \\
        -e 3 -b 16384 --factors 16 --layers 64 32 16 --opt_level O0
    python benchmarks/stability.py --data data/cache/ml-20m --seeds 20 --jobs 1 --output runs/stability-ml20m

The NVIDIA recipe's stability study trains many seeds and reports mean, standard deviation, min and
max of the best HR@10. Each seed is one `ncf.py` process (its flags after `--`, plus --seed S,
--log_path OUTPUT/seed_S.json and --checkpoint_dir OUTPUT/seed_S); --jobs runs several at once,
splitting the CPU threads between them. Writes OUTPUT/stability.json (per seed and summary; the
standard deviation is the sample one, ddof=1) and OUTPUT/stability_hr.png (histogram), prints a
table and the summary as one JSON line.

OUTPUT is checked before any training: it must be new, empty, or an output of this script (its
stability.json, written first, says so, and it holds nothing but the names this script writes), and
never the --data folder or one above it; a rerun then replaces the results of the seeds it trains.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import (  # noqa: E402  (sets OMP_WAIT_POLICY, which every ncf.py inherits)
    EnvironmentFailure,
    UserError,
    atomic_file,
    check_output_path,
    holds,
    main_guard,
)
from logger import read_log  # noqa: E402

# Set per seed by this script; not to be passed after --.
OWN_FLAGS = ("--seed", "-s", "--log_path", "--checkpoint_dir", "--mode", "--resume")
REPORT = "stability.json"
HISTOGRAM = "stability_hr.png"
CREATED_BY = "benchmarks/stability.py"
# Every name this script (or an ncf.py it runs) puts in OUTPUT, temporaries of atomic writes included.
OWN_NAMES = re.compile(r"(stability\.json|stability_hr\.png)(\.tmp-\d+)?|seed_\d+(\.json|\.out)?")


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, ncf_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="%(prog)s --data DIR [--seeds N] [--first_seed S] [--jobs J] [--output DIR] [-- NCF.PY FLAGS]")
    parser.add_argument("--data", required=True, help="dataset cache folder (ncf.py --data)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds to train")
    parser.add_argument("--first_seed", type=int, default=1, help="seeds are first_seed .. first_seed+N-1")
    parser.add_argument("--jobs", type=int, default=1, help="ncf.py processes at a time")
    parser.add_argument("--output", default=os.path.join("runs", "stability"),
                        help="folder for the per-seed logs, checkpoints, stability.json and the histogram")
    args = parser.parse_args(own)
    args.ncf_args = ncf_args
    return args


def validate(args):
    for flag, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data} is not a folder: run ./prepare_dataset.sh NAME first, or pass the "
                        f"cache folder it wrote")
    for flag in args.ncf_args:
        if flag.split("=")[0] in OWN_FLAGS:
            raise UserError(f"{flag} after -- is set by stability.py per seed: remove it")
    check_output(args.output, args.data)
    try:
        import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ImportError:
        raise UserError("matplotlib is not installed, and the histogram needs it: pip install matplotlib") from None


def check_output(output, data):
    check_output_path(output, "--output", folder=True)
    if holds(output, data):
        raise UserError(f"--output {output} holds the --data folder {data}: choose another folder, e.g. "
                        "runs/stability")
    if os.path.isdir(output) and os.listdir(output) and not is_own_output(output):
        raise UserError(f"--output {output} is a folder this script did not write (it holds other files, or no "
                        f"{REPORT} of stability.py), so nothing in it is replaced: move it away or choose another "
                        "folder")


def is_own_output(folder):
    try:
        with open(os.path.join(folder, REPORT)) as f:
            ours = json.load(f).get("created_by") == CREATED_BY
    except (OSError, ValueError, AttributeError):
        return False
    return ours and all(OWN_NAMES.fullmatch(name) for name in os.listdir(folder))


def write_report(folder, report):
    with atomic_file(os.path.join(folder, REPORT)) as f:
        f.write(json.dumps({"created_by": CREATED_BY, **report}, indent=1).encode())


def train_seed(seed, args, threads):
    """Run ncf.py for one seed; returns its summary record."""
    folder = os.path.join(args.output, f"seed_{seed}")
    log_path = os.path.join(args.output, f"seed_{seed}.json")
    out_path = os.path.join(args.output, f"seed_{seed}.out")
    # A rerun replaces this seed's results (the log would otherwise be appended to).
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(log_path):
        os.remove(log_path)
    command = [sys.executable, os.path.join(ROOT, "ncf.py"), "--data", args.data, *args.ncf_args,
               "--seed", str(seed), "--log_path", log_path, "--checkpoint_dir", folder, "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(out_path, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if status:
        with open(out_path) as f:
            last = (f.read().strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"seed {seed}: ncf.py exited with status {status} ({last}); its output is in {out_path}")
    summaries = [r for r in read_log(log_path) if r.get("event") == "summary"]
    if not summaries:
        raise UserError(f"seed {seed}: ncf.py wrote no summary to {log_path}; its output is in {out_path}")
    summary = summaries[-1]
    return {"seed": seed, "best_hr": summary["best_hr"], "best_ndcg": summary["best_ndcg"],
            "best_epoch": summary["best_epoch"], "valid_hr": summary.get("best_valid_hr"),
            "selected_by": summary.get("selected_by"), "wall_s": time.perf_counter() - start, "log": log_path}


def summarise(runs):
    """Mean, sample std, min and max of the best (test) HR; with a validation split, also the mean
    validation HR of the chosen epochs (what a choice between configurations may look at)."""
    hr = np.array([r["best_hr"] for r in runs])
    summary = {"seeds": len(runs), "mean": float(hr.mean()), "std": float(hr.std(ddof=1)) if len(hr) > 1 else 0.0,
               "min": float(hr.min()), "max": float(hr.max())}
    if all(r.get("valid_hr") is not None for r in runs):
        summary["valid_mean"] = float(np.mean([r["valid_hr"] for r in runs]))
    return summary


def histogram(runs, summary, path, k):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    hr = [r["best_hr"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    ax.hist(hr, bins=min(20, max(5, len(hr))), edgecolor="black")
    ax.axvline(summary["mean"], color="black", linestyle="--", label=f"mean {summary['mean']:.4f}")
    ax.set_xlabel(f"best HR@{k}")
    ax.set_ylabel("seeds")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{len(hr)} seeds: std {summary['std']:.4f}, min {summary['min']:.4f}, max {summary['max']:.4f}")
    ax.legend()
    try:
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    validate(args)
    try:
        os.makedirs(args.output, exist_ok=True)
        # Written first, so that a rerun into this folder can tell it is ours.
        write_report(args.output, {"data": args.data, "ncf_args": args.ncf_args, "complete": False})
    except OSError as err:
        raise EnvironmentFailure(f"cannot write to --output {args.output} ({err.strerror or err})") from None
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    print(f"{args.seeds} seeds, {args.jobs} at a time, {threads} threads each, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}: ncf.py --data {args.data} {' '.join(args.ncf_args)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda s: train_seed(s, args, threads), seeds))
    for r in runs:
        chosen = f" (chosen by {r['selected_by']}: {r['valid_hr']:.4f})" if r.get("valid_hr") is not None else ""
        print(f"seed {r['seed']:>4}: best HR {r['best_hr']:.4f} NDCG {r['best_ndcg']:.4f} "
              f"at epoch {r['best_epoch']}{chosen} ({r['wall_s']:.0f} s)")
    summary = summarise(runs)
    k = read_log(runs[0]["log"])[0].get("args", {}).get("topk", 10)
    report = {"data": args.data, "ncf_args": args.ncf_args, "complete": True, "topk": k, "summary": summary,
              "runs": runs}
    try:
        write_report(args.output, report)
        histogram(runs, summary, os.path.join(args.output, HISTOGRAM), k)
    except OSError as err:
        raise EnvironmentFailure(f"cannot write the report into --output {args.output} ({err.strerror or err}); "
                                 "the per-seed logs are there: free some space and rerun") from None
    valid = f" | validation HR@{k} mean {summary['valid_mean']:.4f}" if "valid_mean" in summary else ""
    print(f"best HR@{k} over {summary['seeds']} seeds: mean {summary['mean']:.4f} | std {summary['std']:.4f} | "
          f"min {summary['min']:.4f} | max {summary['max']:.4f}{valid}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
