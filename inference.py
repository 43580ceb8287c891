"""Top-K recommendations from a trained checkpoint, and an inference throughput/latency benchmark.

Recommend (original MovieLens ids in, original ids out):
    python inference.py recommend --data data/cache/ml-20m --checkpoint data/checkpoints/model.pth --users 12 345
    python inference.py recommend --data data/cache/ml-20m --checkpoint data/checkpoints/model.pth --users 12 --json
Benchmark (no data needed: without --checkpoint/--data it builds the default model on ml-20m's shape):
    python inference.py benchmark --batch_sizes 1024 65536 1048576 --precision fp32 amp --device cuda
    python inference.py benchmark --checkpoint data/checkpoints/model.pth --device cpu --batch_sizes 4096

A user is never recommended an item they trained on. Their held-out test item may be recommended:
it is an item they really chose, and the full-ranking metric counts exactly that as a hit.
"""
import cli  # noqa: F401, I001  (sets the OpenMP wait policy before torch starts its thread pool)

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import checkpoint
from cli import UserError, main_guard
from dataloading import load_cache, train_positives_csr
from devices import choose_precision, cpu_has_native_bf16, pick_device
from neumf import DROPOUT, FACTORS, LAYERS, build_model
import synthetic

ML20M_SHAPE = synthetic.PRESETS["ml-20m"][:2]  # users, items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    rec = commands.add_parser("recommend", formatter_class=fmt, help="top-K unseen items of some users")
    rec.add_argument("--data", required=True, help="dataset cache folder the checkpoint was trained on")
    rec.add_argument("--checkpoint", required=True, help="model.pth written by ncf.py")
    rec.add_argument("--users", type=int, nargs="+", required=True, help="ORIGINAL (MovieLens) user ids")
    rec.add_argument("-k", "--topk", type=int, default=10, help="items to recommend per user")
    rec.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    rec.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    bench = commands.add_parser("benchmark", formatter_class=fmt, help="inference samples/s and latency")
    bench.add_argument("--checkpoint", help="model.pth to time (default: a freshly built model)")
    bench.add_argument("--data", help="dataset cache whose user/item counts shape the model")
    bench.add_argument("--users", type=int, default=ML20M_SHAPE[0], help="users, without --data/--checkpoint")
    bench.add_argument("--items", type=int, default=ML20M_SHAPE[1], help="items, without --data/--checkpoint")
    bench.add_argument("-f", "--factors", type=int, default=FACTORS, help="without --checkpoint")
    bench.add_argument("--layers", type=int, nargs="+", default=list(LAYERS),
                       help="without --checkpoint")
    bench.add_argument("--batch_sizes", type=int, nargs="+", default=[1024, 65536, 1048576])
    bench.add_argument("--precision", nargs="+", choices=("fp32", "amp"), default=["fp32", "amp"],
                       help="amp: fp16 autocast on CUDA, bf16 autocast on CPU")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--iterations", type=int, default=20, help="timed batches per configuration")
    bench.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    bench.add_argument("--json_path", help="also write the JSON results here")
    return parser.parse_args(argv)


def load_model(path, cache, device):
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist: pass the model.pth that ncf.py wrote")
    return checkpoint.load_model(path, cache, device, "--checkpoint")[0]


# ---------------------------------------------------------------------------------------------
# Recommendations


def dense_user_ids(cache, original_ids, data_path):
    """Dense ids of original user ids; an unknown one is a user error that names it."""
    originals = cache.user_ids.long()
    order = torch.argsort(originals)
    wanted = torch.tensor(original_ids, dtype=torch.long)
    pos = torch.searchsorted(originals[order], wanted).clamp(max=len(originals) - 1)
    dense = order[pos]
    unknown = [u for u, ok in zip(original_ids, (originals[dense] == wanted).tolist(), strict=True) if not ok]
    if unknown:
        raise UserError(f"--users: user id {', '.join(map(str, unknown))} not in the dataset {data_path} "
                        f"({cache.num_users:,} users with ids {int(originals.min())}..{int(originals.max())}): "
                        f"pass original ids of users who have at least the dataset's min_ratings interactions")
    return dense


@torch.no_grad()
def recommend(model, cache, dense_users, k, device):
    """[(item ids, scores)] per user: the k highest-scored items each user has not trained on."""
    ptr = train_positives_csr(cache.train, cache.num_users)
    items = torch.arange(cache.num_items, device=device)
    results = []
    for user in dense_users.tolist():
        scores = torch.sigmoid(model(torch.full_like(items, user), items).float())
        trained = cache.train[ptr[user] : ptr[user + 1], 1].long().to(device)
        scores[trained] = -1.0  # below any probability
        top = torch.topk(scores, min(k, cache.num_items))
        keep = top.values >= 0  # a user with fewer than k untrained items gets them all
        top_items, top_scores = top.indices[keep].cpu(), top.values[keep].cpu()
        results.append((cache.item_ids[top_items].tolist(), top_scores.tolist()))
    return results


def run_recommend(args):
    if args.topk <= 0:
        raise UserError(f"--topk must be positive, got {args.topk}")
    device = pick_device(args.device)
    cache = load_cache(args.data)
    dense = dense_user_ids(cache, args.users, args.data)
    model = load_model(args.checkpoint, cache, device)
    results = recommend(model, cache, dense, args.topk, device)
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "topk": args.topk, "recommendations": [
            {"user": user, "items": items, "scores": scores}
            for user, (items, scores) in zip(args.users, results, strict=True)
        ]}))
        return
    for user, (items, scores) in zip(args.users, results, strict=True):
        print(f"user {user}: top {len(items)} of the items they have not trained on")
        print(f"{'rank':>6} {'item':>10} {'score':>8}")
        for rank, (item, score) in enumerate(zip(items, scores, strict=True), 1):
            print(f"{rank:>6} {item:>10} {score:>8.4f}")


# ---------------------------------------------------------------------------------------------
# Benchmark


def benchmark_model(args, device):
    """The model to time and a short description of where its shape came from."""
    cache = load_cache(args.data) if args.data else None
    if args.checkpoint:
        return load_model(args.checkpoint, cache, device), f"checkpoint {args.checkpoint}"
    users, items = (cache.num_users, cache.num_items) if cache else (args.users, args.items)
    for flag, value in (("--users", users), ("--items", items), ("--factors", args.factors)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if any(size <= 0 for size in args.layers) or args.layers[0] % 2:
        raise UserError(f"--layers must be positive sizes with an even first one, got {args.layers}")
    config = {"nb_users": users, "nb_items": items, "mf_dim": args.factors, "mlp_layer_sizes": list(args.layers),
              "dropout": DROPOUT}
    torch.manual_seed(0)
    source = f"dataset {args.data}" if cache else "no data"
    return build_model(config, device).eval(), f"untrained model ({source})"


def amp_precision(device):
    """fp16 autocast on CUDA (the recipe's), bf16 autocast on CPU (torch has no fp16 CPU autocast path)."""
    return choose_precision("O2", "float16" if device.type == "cuda" else "bfloat16", device)


@torch.inference_mode()
def time_batches(model, users, items, precision, iterations, warmup, device):
    """Seconds per batch of `iterations` timed batches, after `warmup` untimed ones."""
    seconds = []
    for i in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with precision.autocast():
            model(users, items)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous: wait for them before reading the clock
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def run_benchmark(args):
    for flag, values in (("--batch_sizes", args.batch_sizes), ("--iterations", [args.iterations])):
        if min(values) <= 0:
            raise UserError(f"{flag} must be positive, got {values}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    device = pick_device(args.device)
    model, source = benchmark_model(args, device)
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batch_sizes:
        users = torch.randint(model.nb_users, (batch,), generator=generator, dtype=torch.int32).to(device)
        items = torch.randint(model.nb_items, (batch,), generator=generator, dtype=torch.int32).to(device)
        for requested in args.precision:
            precision = choose_precision("O0", "auto", device) if requested == "fp32" else amp_precision(device)
            seconds = time_batches(model, users, items, precision, args.iterations, args.warmup, device)
            results.append({
                "batch_size": batch, "precision": requested, "precision_run": precision.name,
                "samples_per_s": batch * len(seconds) / seconds.sum(),
                "latency_p50_ms": float(np.percentile(seconds, 50) * 1e3),
                "latency_p99_ms": float(np.percentile(seconds, 99) * 1e3),
                "iterations": args.iterations,
            })
    report = {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "model": model.config, "model_source": source, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "bf16_native_cpu": cpu_has_native_bf16(), "results": results,
    }
    print_table(report)
    print(json.dumps(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=1)


def print_table(report):
    m = report["model"]
    print(f"device {report['device']} | threads {report['threads']} | OMP_WAIT_POLICY {report['omp_wait_policy']} | "
          f"{report['model_source']}: {m['nb_users']:,} users, {m['nb_items']:,} items, factors {m['mf_dim']}, "
          f"layers {m['mlp_layer_sizes']}")
    print(f"{'batch':>10} {'precision':>16} {'samples/s':>14} {'p50 ms':>10} {'p99 ms':>10}")
    for r in report["results"]:
        print(f"{r['batch_size']:>10,} {r['precision_run']:>16} {r['samples_per_s']:>14,.0f} "
              f"{r['latency_p50_ms']:>10.3f} {r['latency_p99_ms']:>10.3f}")
    if any(r["precision_run"].startswith("bf16") for r in report["results"]) and not report["bf16_native_cpu"]:
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and slower")
    sys.stdout.flush()


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.command == "recommend":
        run_recommend(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
