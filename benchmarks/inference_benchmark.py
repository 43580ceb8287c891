"""Inference samples/s and latency: torch eager against onnxruntime, fp32 against autocast.

    python inference.py benchmark --batch_sizes 1024 65536 1048576 --precision fp32 amp --device cuda
    python inference.py benchmark --backend torch onnxruntime --precision fp32 --device cpu --batch_sizes 1 1024
    python benchmarks/inference_benchmark.py ...     the same command, run as its sibling benchmarks are

No data needed: without --checkpoint/--data it builds the default model on ml-20m's shape. A model or batch
that cannot fit in the device's free memory is refused before anything is allocated, and --json_path
replaces only a report this command wrote.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: I001  (sets the OpenMP wait policy before torch loads OpenMP)

import functools
import itertools
import json
import tempfile
import time

import numpy as np
import torch

import devices
import synthetic
from cli import UserError, check_may_write, json_marker, main_guard, owned_file
from dataloading import load_cache
from devices import choose_precision, cpu_has_native_bf16, pick_device
from export import amp_precision, export_onnx, load_model
from model_config import ModelConfig
from neumf import build_model
from serving import MAX_ID, MODEL_FILES, ort_session, require, session_scorer

CREATED_BY = "inference.py benchmark"  # the created_by of --json_path reports: only those are replaced
SHAPE_FLAGS = (("--users", "users"), ("--items", "items"), ("--factors", "factors"), ("--layers", "layers"))
GIB = 2**30


def parse_args(argv=None, prog=None):
    parser = cli.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="model.pth to time (default: a freshly built model)")
    parser.add_argument("--data", help="dataset cache whose user/item counts shape the model")
    parser.add_argument("--users", type=int, help="users, without --data/--checkpoint (default: ml-20m's)")
    parser.add_argument("--items", type=int, help="items, without --data/--checkpoint (default: ml-20m's)")
    parser.add_argument("-f", "--factors", type=int, help="without --checkpoint (default: ncf.py's)")
    parser.add_argument("--layers", type=int, nargs="+", help="without --checkpoint (default: ncf.py's)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1024, 65536, 1048576],
                        help="(user, item) pairs per timed batch; one row per batch size")
    parser.add_argument("--backend", nargs="+", choices=("torch", "onnxruntime"), default=["torch"],
                        help="torch: eager PyTorch; onnxruntime: the model exported to ONNX (fp32 only)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "amp"), default=["fp32", "amp"],
                        help="amp: fp16 autocast on CUDA, bf16 autocast on CPU")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA where there is one; cuda without one is refused (exit 2)")
    parser.add_argument("--iterations", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--json_path", help="also write the JSON results here (a file there is replaced only if "
                                            "it is a report of this command)")
    return parser.parse_args(argv)


def check_benchmark_flags(args):
    """Every benchmark flag and the --json_path, before any work (a report is written after minutes)."""
    for flag, values in (("--batch_sizes", args.batch_sizes), ("--iterations", [args.iterations])):
        if min(values) <= 0:
            raise UserError(f"{flag} must be positive, got {min(values)}")
    for flag, values in (("--batch_sizes", args.batch_sizes), ("--precision", args.precision),
                         ("--backend", args.backend)):
        if len(set(values)) < len(values):  # the same configuration twice: rows that differ by warm-up alone
            raise UserError(f"{flag} names a value twice ({' '.join(map(str, values))}): give each once")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")
    given = [flag for flag, name in SHAPE_FLAGS if getattr(args, name) is not None]
    if args.checkpoint and given:
        raise UserError(f"{given[0]} shapes a freshly built model, and --checkpoint brings its own shape: drop "
                        f"{given[0]}, or drop --checkpoint")
    if args.data and {"--users", "--items"} & set(given):
        raise UserError("--users and --items come from the --data cache's counts: drop them, or drop --data")
    for flag, value in (("--users", args.users), ("--items", args.items)):
        if value is not None and not 1 <= value <= MAX_ID:
            raise UserError(f"{flag} must be between 1 and {MAX_ID:,} (ids are int32), got {value}")
    if args.factors is not None and args.factors <= 0:
        raise UserError(f"--factors must be positive, got {args.factors}")
    if args.layers is not None and (min(args.layers) <= 0 or args.layers[0] % 2):
        raise UserError(f"--layers must be positive sizes with an even first one, got {args.layers}")
    if args.json_path:
        check_may_write(args.json_path, "--json_path", json_marker(CREATED_BY), "a benchmark report")


def fresh_config(args, cache):
    """The config of the model to build: --data's counts, or the flags, or ml-20m's shape and ncf.py's model."""
    users, items = (cache.num_users, cache.num_items) if cache else synthetic.PRESETS["ml-20m"][:2]
    shape = {"mf_dim": args.factors, "mlp_layer_sizes": None if args.layers is None else tuple(args.layers)}
    return ModelConfig(users if args.users is None else args.users, items if args.items is None else args.items,
                       **{key: value for key, value in shape.items() if value is not None}).as_dict()


def benchmark_model(args, device):
    """The model to time and a short description of where its shape came from; refused before it is built
    if it, or it and the largest batch's activations, do not fit in the device's memory."""
    cache = load_cache(args.data) if args.data else None
    onnx = "onnxruntime" in args.backend
    if args.checkpoint:
        model = load_model(args.checkpoint, cache, device)[0]
        check_memory(model.config, args.batch_sizes, device, onnx)
        return model, f"checkpoint {args.checkpoint}"
    config = fresh_config(args, cache)
    check_memory(config, args.batch_sizes, device, onnx)
    torch.manual_seed(0)
    source = f"dataset {args.data}" if cache else "no data"
    return build_model(config, device).eval(), f"untrained model ({source})"


def memory_needs(config, onnx):
    """(bytes, bytes per sample): an upper bound on what timing a model of `config` holds in memory, for the
    model and per sample of a batch. Per sample: every activation of the forward in fp32, as if all were alive
    at once (the forward frees each layer's input as it goes, which leaves room for autocast's half-width
    copies), and the index tensors (int32; int64 for onnxruntime)."""
    mf, layers = config["mf_dim"], list(config["mlp_layer_sizes"])
    half = layers[0] // 2 if layers else 0
    rows = config["nb_users"] + config["nb_items"]
    last = layers[-1] if layers else 0
    params = rows * (mf + half) + sum(a * b + b for a, b in itertools.pairwise(layers)) + mf + last + 1
    fixed = 4 * params * (2 if onnx else 1) + 4 * rows * (layers[1] if len(layers) > 1 else 0)  # + factored terms
    per_sample = 4 * (2 * (mf + half) + mf + sum(layers) + 1) + (32 if onnx else 16)
    return fixed, per_sample


def check_memory(config, batch_sizes, device, onnx):
    """A user error, before anything is allocated, if the model or its largest batch cannot fit."""
    fixed, per_sample = memory_needs(config, onnx)
    free, batch = devices.memory_bytes(device), max(batch_sizes)
    if fixed > free:
        raise UserError(f"a model of {config['nb_users']:,} users and {config['nb_items']:,} items (factors "
                        f"{config['mf_dim']}, layers {config['mlp_layer_sizes']}) needs about {fixed / GIB:,.1f} GiB, "
                        f"more than the {free / GIB:,.1f} GiB of {device.type} memory available: choose a smaller "
                        f"shape")
    if fixed + batch * per_sample > free:
        raise UserError(f"--batch_sizes {batch:,} needs about {(fixed + batch * per_sample) / GIB:,.1f} GiB "
                        f"({per_sample} bytes a sample), more than the {free / GIB:,.1f} GiB of {device.type} memory "
                        f"available: use batch sizes up to {(free - fixed) // per_sample:,}")


def time_calls(run, iterations, warmup):
    """Seconds per call of `iterations` timed calls of `run`, after `warmup` untimed ones."""
    seconds = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        run()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return np.array(seconds)


def torch_runner(model, users, items, precision, device):
    def run():
        with torch.inference_mode(), precision.autocast():
            model(users, items)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # kernels are asynchronous: wait for them before reading the clock

    return run


def onnxruntime_providers(ort, device):
    if device.type != "cuda":
        return ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--backend onnxruntime --device cuda needs onnxruntime with CUDA "
                        "(pip install onnxruntime-gpu): use --device cpu, or install it")
    return ("CUDAExecutionProvider",)


def runners(args, model, device, users, items, onnx_score):
    """(backend, precision asked, precision run, function to time) of one batch, in the report's order."""
    for backend in args.backend:
        for requested in args.precision:
            if backend == "onnxruntime" and requested != "fp32":
                continue  # the ONNX model is fp32; print_table says so
            if backend == "torch":
                precision = choose_precision("O0", "auto", device) if requested == "fp32" else amp_precision(device)
                yield backend, requested, precision.name, torch_runner(model, users.to(device), items.to(device),
                                                                       precision, device)
            else:
                yield backend, requested, "fp32", functools.partial(onnx_score, users.long().numpy(),
                                                                    items.long().numpy())


def time_batches(args, model, device, onnx_score):
    """One result per batch size, backend and precision."""
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batch_sizes:
        users = torch.randint(model.nb_users, (batch,), generator=generator, dtype=torch.int32)
        items = torch.randint(model.nb_items, (batch,), generator=generator, dtype=torch.int32)
        for backend, requested, precision_run, run in runners(args, model, device, users, items, onnx_score):
            seconds = time_calls(run, args.iterations, args.warmup)
            results.append({
                "backend": backend, "batch_size": batch, "precision": requested,
                "precision_run": precision_run, "samples_per_s": batch * len(seconds) / seconds.sum(),
                "latency_p50_ms": float(np.percentile(seconds, 50) * 1e3),
                "latency_p99_ms": float(np.percentile(seconds, 99) * 1e3),
                "iterations": args.iterations,
            })
    return results


def run_benchmark(args):
    check_benchmark_flags(args)
    ort = (require("benchmark --backend onnxruntime", "onnx", "onnxscript", "onnxruntime")[-1]
           if "onnxruntime" in args.backend else None)
    device = pick_device(args.device)
    providers = onnxruntime_providers(ort, device) if ort else None
    model, source = benchmark_model(args, device)
    with tempfile.TemporaryDirectory() as folder:
        onnx_score = None
        if ort:  # the same model, exported as `inference.py export` does, with torch's thread count
            path = os.path.join(folder, MODEL_FILES["onnx"])
            export_onnx(model, path)
            onnx_score = session_scorer(ort_session(ort, path, torch.get_num_threads(), providers))
        results = time_batches(args, model, device, onnx_score)
    report = {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "model": model.config, "model_source": source, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "bf16_native_cpu": cpu_has_native_bf16(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "backends": args.backend, "onnxruntime": ort.__version__ if ort else None, "results": results,
    }
    print_table(report, skipped_amp="onnxruntime" in args.backend and "amp" in args.precision)
    print(json.dumps(report))
    if args.json_path:
        with owned_file(args.json_path, "--json_path", json_marker(CREATED_BY), "a benchmark report") as f:
            f.write(json.dumps({"created_by": CREATED_BY, **report}, indent=1).encode())


def print_table(report, skipped_amp=False):
    m = report["model"]
    print(f"device {report['device']} | threads {report['threads']} | OMP_WAIT_POLICY {report['omp_wait_policy']} | "
          f"{report['model_source']}: {m['nb_users']:,} users, {m['nb_items']:,} items, factors {m['mf_dim']}, "
          f"layers {m['mlp_layer_sizes']}")
    print(f"{'batch':>10} {'backend':>12} {'precision':>16} {'samples/s':>14} {'p50 ms':>10} {'p99 ms':>10}")
    for r in report["results"]:
        print(f"{r['batch_size']:>10,} {r['backend']:>12} {r['precision_run']:>16} {r['samples_per_s']:>14,.0f} "
              f"{r['latency_p50_ms']:>10.3f} {r['latency_p99_ms']:>10.3f}")
    if skipped_amp:
        print("note: onnxruntime runs the fp32 ONNX model only, so amp rows are torch's")
    if any(r["precision_run"].startswith("bf16") for r in report["results"]) and not report["bf16_native_cpu"]:
        print("note: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is emulated and slower")
    sys.stdout.flush()


@main_guard
def main(argv=None, prog=None):
    run_benchmark(parse_args(argv, prog))


if __name__ == "__main__":
    main()
