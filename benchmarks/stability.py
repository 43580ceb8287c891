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

Every flag (those after -- too, by ncf.py's own parser) and OUTPUT are checked before any training. OUTPUT
must be new, empty, or an output of this script (its stability.json, written first, says so, and it holds
nothing but the names this script writes), and never the --data folder or one above it. A rerun replaces
the log and output of each seed it trains, each only if its content shows it is one (an ncf.py log, an
output this script started); the checkpoints in OUTPUT/seed_S are ncf.py's to replace, and nothing else
there is touched.
"""
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import (  # noqa: E402  (sets OMP_WAIT_POLICY, which every ncf.py inherits)
    LOCK_FILE,
    ArgumentParser,
    EnvironmentFailure,
    UserError,
    check_may_write,
    check_output_path,
    hold_lock,
    holds,
    json_marker,
    main_guard,
    open_owned_for_append,
    owned_file,
    remove_owned,
)
from logger import is_run_log, read_log  # noqa: E402
from logger.plot import plot_of, save_figure  # noqa: E402

# Set per seed by this script; not to be passed after --.
OWN_FLAGS = ("--seed", "-s", "--log_path", "--checkpoint_dir", "--mode", "--resume")
REPORT = "stability.json"
HISTOGRAM = "stability_hr.png"
CREATED_BY = "benchmarks/stability.py"
# Every name this script (or an ncf.py it runs) puts in OUTPUT, temporaries of atomic writes included.
OWN_NAMES = re.compile(r"(stability\.json|stability_hr\.png)(\.tmp-\d+(\.partial)?)?|seed_\d+(\.json|\.out)?|\.lock")
SEED_FILE = re.compile(r"seed_(\d+)(\.json|\.out)?")
# The first line of each OUTPUT/seed_S.out: the proof that this script started it, so that a rerun may replace it.
OUT_HEADER = "benchmarks/stability.py: the output of ncf.py for seed "
SEEDS_LIMIT = 2**32  # ncf.py's --seed range


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, ncf_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
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
    """Every flag and path, before any work: a mistake is found now, not after the first seed's training."""
    for flag, value in (("--seeds", args.seeds), ("--jobs", args.jobs)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.first_seed < 0:
        raise UserError(f"--first_seed must be 0 or more (ncf.py's --seed range is [0, 2^32)), got {args.first_seed}")
    if args.first_seed + args.seeds > SEEDS_LIMIT:
        raise UserError(f"--first_seed {args.first_seed} with --seeds {args.seeds} goes past ncf.py's --seed range "
                        "[0, 2^32): choose a smaller --first_seed or fewer --seeds")
    if not os.path.isdir(args.data):
        raise UserError(f"--data {args.data} is not a folder: run ./prepare_dataset.sh NAME first, or pass the "
                        f"cache folder it wrote")
    for flag in args.ncf_args:
        if flag.split("=")[0] in OWN_FLAGS:
            raise UserError(f"{flag} after -- is set by stability.py per seed: remove it")
    check_output(args.output, args.data)
    check_ncf_args(args)
    try:
        import matplotlib  # noqa: F401  (checked before hours of training, not after)
    except ImportError:
        raise UserError("matplotlib is not installed, and the histogram needs it: pip install matplotlib") from None


def check_ncf_args(args):
    """The flags after -- through ncf.py's own parser and checks, and --data as a cache, as the first seed's
    ncf.py would see them (one line, not ncf.py's usage text)."""
    import cache_format
    import ncf

    problem = cache_format.cache_problem(args.data)
    if problem:
        raise UserError(f"--data {args.data} is not a dataset cache ({problem}): run ./prepare_dataset.sh NAME, or "
                        "pass the cache folder it wrote")
    parser = ncf.build_parser()

    def error(message):
        raise UserError(f"the ncf.py flags after --: {message}: fix them (python ncf.py --help lists them)")

    parser.error = error
    parsed = parser.parse_args(["--data", args.data, *args.ncf_args, "--seed", str(args.first_seed)])
    try:
        ncf.validate_args(parsed)
    except UserError as err:
        raise UserError(f"the ncf.py flags after --: {err}") from None


def check_output(output, data):
    check_output_path(output, "--output", folder=True)
    if holds(output, data):
        raise UserError(f"--output {output} holds the --data folder {data}: choose another folder, e.g. "
                        "runs/stability")
    if not os.path.isdir(output):
        return
    if set(os.listdir(output)) - {LOCK_FILE} and not is_own_output(output):  # only a lock: a run that wrote nothing
        raise UserError(f"--output {output} is a folder this script did not write (it holds other files, or no "
                        f"{REPORT} of stability.py), so nothing in it is replaced: move it away or choose another "
                        "folder")
    for name in os.listdir(output):  # what a rerun replaces must show, by its content, that it is ours
        match = SEED_FILE.fullmatch(name)
        path = os.path.join(output, name)
        if match and match.group(2) == ".json":
            check_may_write(path, "--output", is_run_log, "an ncf.py log")
        elif match and match.group(2) == ".out":
            check_may_write(path, "--output", is_seed_output, "an ncf.py output of stability.py")
        elif match:
            check_output_path(path, "--output", folder=True)
        elif name == HISTOGRAM:
            check_may_write(path, "--output", plot_of(CREATED_BY), "a histogram of stability.py")


def is_seed_output(path):
    """A proof (cli.may_write): the file starts with the line train_seed writes first."""
    with open(path, encoding="utf-8") as f:
        return f.readline().startswith(OUT_HEADER)


def is_own_output(folder):
    try:
        with open(os.path.join(folder, REPORT), encoding="utf-8") as f:
            ours = json.load(f).get("created_by") == CREATED_BY
    except (OSError, ValueError, AttributeError):
        return False
    return ours and all(OWN_NAMES.fullmatch(name) for name in os.listdir(folder))


def write_report(folder, report):
    with owned_file(os.path.join(folder, REPORT), "--output", json_marker(CREATED_BY), "a stability report") as f:
        f.write(json.dumps({"created_by": CREATED_BY, **report}, indent=1).encode())


def replace_own(path, proof, what):
    """Remove `path` for a rerun if `proof` shows it is ours; a file that has become something else since
    validate() is refused, not replaced."""
    if not remove_owned(path, proof) and os.path.lexists(path) and os.path.getsize(path):
        raise UserError(f"--output: {path} is not {what} (it changed while this script ran), so it is not "
                        "replaced: move it away and rerun")


def train_seed(seed, args, threads):
    """Run ncf.py for one seed; returns its summary record."""
    folder = os.path.join(args.output, f"seed_{seed}")
    log_path = os.path.join(args.output, f"seed_{seed}.json")
    out_path = os.path.join(args.output, f"seed_{seed}.out")
    # A rerun replaces this seed's log (ncf.py would append to it) and output; the checkpoints are ncf.py's.
    replace_own(log_path, is_run_log, "an ncf.py log")
    replace_own(out_path, is_seed_output, "an ncf.py output of stability.py")
    command = [sys.executable, os.path.join(ROOT, "ncf.py"), "--data", args.data, *args.ncf_args,
               "--seed", str(seed), "--log_path", log_path, "--checkpoint_dir", folder, "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open_owned_for_append(out_path, "--output", is_seed_output, "an ncf.py output of stability.py") as out:
        out.write(f"{OUT_HEADER}{seed}\n")
        out.flush()
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if status:
        with open(out_path, encoding="utf-8") as f:
            last = (f.read().strip().splitlines()[1:] or ["(no output)"])[-1]
        raise UserError(f"seed {seed}: ncf.py exited with status {status} ({last}); its output is in {out_path}")
    try:
        records = read_log(log_path)
    except (OSError, ValueError) as err:
        raise UserError(f"seed {seed}: cannot read ncf.py's log {log_path} ({err}); its output is in "
                        f"{out_path}") from None
    summaries = [r for r in records if isinstance(r, dict) and r.get("event") == "summary"]
    if not summaries:
        raise UserError(f"seed {seed}: ncf.py wrote no summary to {log_path}; its output is in {out_path}")
    summary = summaries[-1]
    return {"seed": seed, "best_hr": summary["best_hr"], "best_ndcg": summary["best_ndcg"],
            "best_epoch": summary["best_epoch"], "valid_hr": summary.get("best_valid_hr"),
            "selected_by": summary.get("selected_by"), "wall_s": time.perf_counter() - start, "log": log_path}


def topk_of(log_path):
    """The k of the run in an ncf.py log (its last config record)."""
    configs = [r for r in read_log(log_path) if isinstance(r, dict) and r.get("event") == "config"]
    saved = configs[-1].get("args") if configs else None
    topk = saved.get("topk", 10) if isinstance(saved, dict) else 10
    return topk if isinstance(topk, int) else 10


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
        save_figure(fig, path, "--output", CREATED_BY)
    finally:
        plt.close(fig)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    validate(args)
    try:
        os.makedirs(args.output, exist_ok=True)
        lock = hold_lock(os.path.join(args.output, LOCK_FILE), f"--output {args.output}")
    except OSError as err:
        raise EnvironmentFailure(f"cannot write to --output {args.output} ({err.strerror or err})") from None
    with lock:
        run_seeds(args)


def run_seeds(args):
    """Train every seed and write the report and the histogram (OUTPUT is checked and locked)."""
    try:
        # Written first, so that a rerun into this folder can tell it is ours.
        write_report(args.output, {"data": args.data, "ncf_args": args.ncf_args, "complete": False})
    except OSError as err:
        raise EnvironmentFailure(f"cannot write to --output {args.output} ({err.strerror or err})") from None
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = min(args.jobs, args.seeds)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    print(f"{args.seeds} seeds, {jobs} at a time, {threads} threads each, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY')}: ncf.py --data {args.data} {' '.join(args.ncf_args)}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        runs = list(pool.map(lambda s: train_seed(s, args, threads), seeds))
    for r in runs:
        chosen = f" (chosen by {r['selected_by']}: {r['valid_hr']:.4f})" if r.get("valid_hr") is not None else ""
        print(f"seed {r['seed']:>4}: best HR {r['best_hr']:.4f} NDCG {r['best_ndcg']:.4f} "
              f"at epoch {r['best_epoch']}{chosen} ({r['wall_s']:.0f} s)")
    summary = summarise(runs)
    k = topk_of(runs[0]["log"])
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
