"""Batch recommendations at ml-20m's shape: users/s and peak memory of `inference.py recommend --output`.

    python benchmarks/batch_recommend_benchmark.py --users_timed 2000 --source checkpoint onnx --precision fp32 amp

It runs the command's own code (serving.write_recommendations: ranking in chunks, training items excluded,
the Parquet or CSV file written through its owner) for the first --users_timed users of a model of ml-20m's
shape (138,493 users, 26,744 items, the default NeuMF; untrained, since speed does not depend on the weights)
and 19.86M training positives drawn at random (ml-20m's count, spread evenly over its users). Each (source,
precision) runs in its own process, so that its peak memory (max RSS) is its own: `checkpoint` scores through
torch (neumf.score_candidates, as `recommend --checkpoint`; fp32, or amp: bf16 autocast on CPU, fp16 on CUDA),
`onnx` through onnxruntime on the CPU, as `recommend --model` (fp32, a process without torch). A few thousand
users give a steady users/s; all of ml-20m's take hours on a small CPU, and the table gives that estimate.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: I001  (sets the OpenMP wait policy before anything starts a thread pool)

import argparse
import json
import subprocess
import tempfile

import numpy as np

import serving
from cli import EnvironmentFailure, UserError, main_guard

# torch is imported inside the functions of the parent and of the checkpoint child only: the onnx child
# measures what a serving machine holds, which has no torch.
MAX_ID = 2**31 - 1  # ids are int32
MIN_TRAINING_ITEMS = 19  # MovieLens keeps users with at least 20 ratings, one of them held out for test


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, help="users of the model (default: ml-20m's)")
    p.add_argument("--items", type=int, help="items of the model (default: ml-20m's)")
    p.add_argument("--positives", type=int, help="training positives, excluded from the lists (default: ml-20m's)")
    p.add_argument("--users_timed", type=int, default=2000, help="users recommended for and timed (the first ones)")
    p.add_argument("-k", "--topk", type=int, default=10)
    p.add_argument("--chunk_users", type=int, default=serving.DEFAULT_CHUNK_USERS, help="as recommend's")
    p.add_argument("--source", nargs="+", choices=("checkpoint", "onnx"), default=["checkpoint", "onnx"],
                   help="onnx needs requirements-export.txt")
    p.add_argument("--precision", nargs="+", choices=("fp32", "amp"), default=["fp32", "amp"],
                   help="for checkpoint; onnx always scores in fp32")
    p.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="of the file written")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="for checkpoint")
    p.add_argument("--child", nargs=2, metavar=("SOURCE", "PRECISION"), help=argparse.SUPPRESS)
    p.add_argument("--onnx_path", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def resolve_shape(args):
    """(users, items, positives): the flags, or ml-20m's (its ratings less one test item per user)."""
    from synthetic import PRESETS  # pandas: only in the parent, which passes the numbers to its children

    users, items, mean = PRESETS["ml-20m"]
    return (args.users or users, args.items or items,
            args.positives if args.positives is not None else round(users * mean) - users)


def validate(args, users, items, positives):
    """Every flag, before any work (each configuration runs for minutes in its own process)."""
    for flag, value in (("--users", users), ("--items", items), ("--users_timed", args.users_timed),
                        ("--topk", args.topk), ("--chunk_users", args.chunk_users)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    for flag, value in (("--users", users), ("--items", items)):
        if value > MAX_ID:
            raise UserError(f"{flag} must be at most {MAX_ID:,} (ids are int32), got {value:,}")
    if not 0 <= positives <= users * items:
        raise UserError(f"--positives must be between 0 and users x items ({users * items:,}), got {positives:,}")
    if args.users_timed > users:
        raise UserError(f"--users_timed {args.users_timed:,} is more than the {users:,} users: time at most all")
    check_memory(args, users, items, positives)


def check_memory(args, users, items, positives):
    """The model, the training items and one scorer call's activations against free memory, before any of
    them is allocated (inference_benchmark.memory_needs: an upper bound per pair)."""
    import torch
    from inference_benchmark import GIB, memory_needs

    import devices
    from model_config import ModelConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available: use --device cpu")
    config = ModelConfig(users, items).as_dict()  # the default model: ncf.py's factors, layers and dropout
    model, per_pair = memory_needs(config, onnx="onnx" in args.source)
    call = max(items, serving.ONNX_PAIRS_PER_CALL)  # a checkpoint's activations are per user on a CPU
    need = model + call * per_pair + 4 * positives + 16 * (users + items)
    free = devices.memory_bytes(torch.device("cpu"))
    if need > free:
        raise UserError(f"a model of {users:,} users and {items:,} items with {positives:,} training positives needs "
                        f"about {need / GIB:,.1f} GiB, more than the {free / GIB:,.1f} GiB of memory available: "
                        f"choose a smaller shape")
    return config


def synthetic_maps(users, items, positives, seed=0):
    """Id maps of a dataset of this shape: ids as convert leaves them, training items drawn at random
    (each user at least MIN_TRAINING_ITEMS where there are enough, the rest spread evenly)."""
    rng = np.random.default_rng(seed)
    base = min(MIN_TRAINING_ITEMS, positives // users)
    counts = base + rng.multinomial(positives - base * users, np.full(users, 1 / users))
    return {"user_ids": np.arange(1, users + 1, dtype=np.int64), "item_ids": np.arange(1, items + 1, dtype=np.int64),
            "train_ptr": np.concatenate([[0], np.cumsum(counts)]),
            "train_items": rng.integers(0, items, size=positives, dtype=np.int32)}


def build_model(config, device):
    import torch

    import neumf

    torch.manual_seed(0)
    return neumf.build_model(config, device).eval()


def memory_status(field):
    """Bytes of VmRSS (now) or VmHWM (the peak) of this process. Not getrusage's ru_maxrss: Linux carries it
    across exec, so a child would report its parent's peak (torch and the ONNX export) when larger."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child_source(args, maps, items, source, precision):
    """serving.Source as `recommend` builds it for --checkpoint (export.checkpoint_source) or --model (an ONNX
    export: serving.export_source), on a model built here rather than loaded from files."""
    if source == "onnx":
        ort = serving.require("--source onnx", "onnxruntime")
        score = serving.session_scorer(serving.ort_session(ort, args.onnx_path))
        return (serving.Source(maps, serving.rows_of_pairs(score, items),
                               max(1, serving.ONNX_PAIRS_PER_CALL // items), {"precision": "fp32"}), "fp32", 0)
    import torch

    import export
    from devices import choose_precision

    device = torch.device(args.device)
    model = build_model(check_memory(args, args.users, items, args.positives), device)
    chosen = export.amp_precision(device) if precision == "amp" else choose_precision("O0", "auto", device)
    return (serving.Source(maps, export.users_scorer(model, device, chosen),
                           max(1, export.TORCH_PAIRS_PER_CALL // items), {"precision": chosen.name}),
            chosen.name, torch.get_num_threads())


def measure_one(args, source, precision):
    """One configuration, in this (child) process: its JSON record."""
    maps = synthetic_maps(args.users, args.items, args.positives)
    scored, precision_run, threads = child_source(args, maps, args.items, source, precision)
    users = np.arange(args.users_timed)
    scored.score_users(users[: scored.users_per_call])  # warm-up: first-call allocations and kernel choice
    before = memory_status("VmRSS")
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, f"recs.{args.format}")
        _, rows, seconds = serving.write_recommendations(scored, users, args.topk, args.chunk_users, output, False)
        size = os.path.getsize(output)
    return {"source": source, "precision": precision, "precision_run": precision_run, "device":
            "cpu" if source == "onnx" else args.device, "threads": threads, "users": args.users, "items": args.items,
            "positives": args.positives, "users_timed": args.users_timed, "topk": args.topk,
            "chunk_users": args.chunk_users, "users_per_call": scored.users_per_call, "format": args.format,
            "rows": rows, "file_bytes": size, "seconds": seconds, "users_per_s": args.users_timed / seconds,
            "rss_before_bytes": before, "peak_rss_bytes": memory_status("VmHWM")}


def run_child(argv, source, precision):
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", source, precision]
    proc = subprocess.run(cmd, capture_output=True, check=False, encoding="utf-8")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        raise EnvironmentFailure(f"{source} {precision} failed with exit status {proc.returncode}{killed}: {last}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(record), flush=True)
    return record


def export_once(config, folder):
    """The model, exported to ONNX as `inference.py export` does, for the onnx children."""
    import torch

    from export import export_onnx

    path = os.path.join(folder, serving.MODEL_FILES["onnx"])
    export_onnx(build_model(config, torch.device("cpu")), path)
    return path


def print_table(results, all_users):
    print(f"\n{'source':<11} {'precision':<16} {'users':>7} {'users/s':>9} {'peak RSS GB':>11} {'before GB':>9} "
          f"{'all users, h':>12}")
    for r in results:
        print(f"{r['source']:<11} {r['precision_run']:<16} {r['users_timed']:>7,} {r['users_per_s']:>9,.1f} "
              f"{r['peak_rss_bytes'] / 1e9:>11.2f} {r['rss_before_bytes'] / 1e9:>9.2f} "
              f"{all_users / r['users_per_s'] / 3600:>12.1f}")


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(args, *args.child)), flush=True)
        return
    users, items, positives = resolve_shape(args)
    validate(args, users, items, positives)
    shape = ["--users", str(users), "--items", str(items), "--positives", str(positives)]
    with tempfile.TemporaryDirectory() as folder:
        if "onnx" in args.source:
            serving.require("--source onnx", "onnx", "onnxscript", "onnxruntime")
            shape += ["--onnx_path", export_once(check_memory(args, users, items, positives), folder)]
        configurations = [(s, p) for s in args.source for p in (args.precision if s == "checkpoint" else ["fp32"])]
        results = [run_child([*argv, *shape], source, precision) for source, precision in dict.fromkeys(configurations)]
    print_table(results, users)


if __name__ == "__main__":
    main()
