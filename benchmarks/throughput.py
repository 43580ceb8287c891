"""Training and evaluation throughput of ncf.py's own step code on ml-20m-shaped synthetic data.

    python benchmarks/throughput.py --device cpu --batch_size 65536 1048576 --precision fp32 amp
    python benchmarks/throughput.py --device cuda --batch_size 1048576 --precision fp32 amp

The data are random tensors of ml-20m's shape held in memory (138,493 users, 26,744 items, 19.86M
training positives, 4 negatives each; 101 evaluation candidates per user): throughput does not depend
on their values. Each (batch size, precision) runs in its own child process, so its peak memory is its
own; each prints one JSON line, and a table and the machine's floor follow.

Every flag is checked before any work, the sizes against the memory they need; --json_out appends only to
a file of this script's (every line a JSON record whose "created_by" says so).
"""
import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: I001  (sets the OpenMP wait policy before torch loads OpenMP)

import torch

import allocator
import ncf
from cli import UserError, check_may_write, main_guard, open_owned_for_append
from dataloading import EpochSampler, TestData
from devices import choose_precision, memory_bytes, set_matmul_precision
from model_config import DROPOUT, FACTORS, LAYERS, ModelConfig
from neumf import build_model
from synthetic import PRESETS

# ml-20m's shape (synthetic.py's preset) and its training positives after convert.py's protocol.
ML20M = {"users": PRESETS["ml-20m"][0], "items": PRESETS["ml-20m"][1], "positives": 19_861_770}
CREATED_BY = "benchmarks/throughput.py"
MAX_ID = 2**31 - 1  # ids are int32
POSITIVE = ("users", "items", "positives", "negatives", "candidates", "eval_repeats", "valid_batch_size", "factors",
            "steps", "grads_accumulated")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda without a CUDA device is refused (exit 2); the default is cuda where there is one")
    p.add_argument("--batch_size", type=int, nargs="+", default=[65536, 1048576],
                   help="global batches per optimizer step to time, each in its own process")
    p.add_argument("--precision", choices=("fp32", "amp"), nargs="+", default=["fp32", "amp"],
                   help="amp: fp16 autocast + loss scaling on CUDA, bf16 autocast on CPU (forced even without "
                        "native bf16, to measure it)")
    p.add_argument("--users", type=int, default=ML20M["users"], help="users of the random data (ml-20m's)")
    p.add_argument("--items", type=int, default=ML20M["items"], help="items of the random data (ml-20m's)")
    p.add_argument("--positives", type=int, default=ML20M["positives"],
                   help="training positives (ml-20m's after convert.py)")
    p.add_argument("--negatives", type=int, default=4, help="negatives per positive, as ncf.py's -n")
    p.add_argument("--candidates", type=int, default=101, help="evaluation candidates per user")
    p.add_argument("--eval_users", type=int, default=None, help="users scored in the eval timing (default: all)")
    p.add_argument("--eval_repeats", type=int, default=3, help="timed evaluations (the median is reported)")
    p.add_argument("--valid_batch_size", type=int, default=1048576, help="evaluation pairs at a time, as ncf.py's")
    p.add_argument("--factors", type=int, default=FACTORS, help="GMF factors, as ncf.py's -f")
    p.add_argument("--layers", type=int, nargs="+", default=list(LAYERS), help="MLP layer sizes, as ncf.py's")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="dropout rate, as ncf.py's")
    p.add_argument("--grads_accumulated", type=int, default=1,
                   help="micro-batches each --batch_size step is cut into, as ncf.py's --accumulate split (same "
                        "maths, smaller activations)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--compile", action="store_true",
                   help="train and evaluate through torch.compile, as ncf.py --compile (inductor; eager's RNG, so "
                        "the same dropout masks); the first step's time, compile included, is reported as "
                        "first_step_s")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no_floor", action="store_true", help="skip measuring the matmul rate and memory bandwidth")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, profile --steps more training steps (torch.profiler) and print their N "
                        "operators of most self time (0: no profile)")
    p.add_argument("--json_out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--child", nargs=2, metavar=("BATCH", "PRECISION"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def validate(args):
    """Every flag, before any work (each configuration runs for minutes in a child process)."""
    for name in POSITIVE:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("eval_users", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("users", "items"):
        if getattr(args, name) > MAX_ID:
            raise UserError(f"--{name} must be at most {MAX_ID:,} (ids are int32), got {getattr(args, name)}")
    for name in ("warmup", "profile"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if min(args.layers) <= 0 or args.layers[0] % 2:
        raise UserError(f"--layers must be positive sizes with an even first one, got {args.layers}")
    if not 0 <= args.dropout < 1:  # NaN included
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    for batch in args.batch_size:
        check_batch(args, batch)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available: use --device cpu")
    if args.compile and (switch := ncf.compile_switched_off()):  # its figures would be eager's, recorded as compiled
        raise UserError(f"--compile but {switch}=1 is set, so torch.compile would compile nothing: unset it, or leave "
                        f"--compile out")
    check_memory(args)


def check_batch(args, batch):
    if batch <= 0 or batch % args.grads_accumulated:
        raise UserError(f"--batch_size {batch} must be a positive multiple of --grads_accumulated "
                        f"{args.grads_accumulated}")
    samples = args.positives * (1 + args.negatives)
    full, rest = divmod(samples, batch)
    steps = min(args.warmup + args.steps, full + (rest >= args.grads_accumulated))
    if steps - max(args.warmup, 1) < 1:  # see time_training: the first step and the warm-up are not timed
        raise UserError(f"--batch_size {batch:,}: an epoch of {samples:,} samples has {steps} step(s) of it, which "
                        f"leaves none to time after --warmup {args.warmup}: choose a smaller batch, more --positives, "
                        f"or more --steps")


def check_memory(args):
    """A coarse bound on a child's memory (the data and its epoch's permutation, the model with its gradients
    and Adam's moments, a training batch's activations and their gradients: half of train_bytes, which counts
    each written and read) against what the device has free: absurd sizes are refused before the minutes of
    work, not by the OOM killer. Evaluation works in pieces, so its batch is left out."""

    cost = per_sample_cost(args)
    data = 8 * args.positives * (2 + args.negatives) + 8 * args.positives * (1 + args.negatives)
    model = 16 * cost["params"]
    batches = max(args.batch_size) * cost["train_bytes"] // 2
    need, free = data + model + batches, memory_bytes(torch.device(args.device))
    if need > free:
        raise UserError(f"these sizes need about {need / 2**30:,.1f} GiB ({data / 2**30:,.1f} of data, "
                        f"{model / 2**30:,.1f} of model and optimizer, {batches / 2**30:,.1f} of batches), more than "
                        f"the {free / 2**30:,.1f} GiB of {args.device} memory free: choose smaller --positives, "
                        "--users/--items or --batch_size")


def is_throughput_log(path):
    """A proof (cli.may_write): every line of the file is a JSON record this script wrote."""
    with open(path, encoding="utf-8") as f:
        return all(json.loads(line).get("created_by") == CREATED_BY for line in f if line.strip())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device, precision):
    """ml-20m-shaped random positives in an EpochSampler, the model and ncf.py's optimizer and scaler."""
    train = torch.stack((torch.randint(args.users, (args.positives,), dtype=torch.int32),
                         torch.randint(args.items, (args.positives,), dtype=torch.int32)), dim=1)
    sampler = EpochSampler(train, args.items, args.negatives, device, seed=0)
    model = build_model(ModelConfig(args.users, args.items, args.factors, tuple(args.layers), args.dropout), device)
    defaults = ncf.parse_args([])  # the recipe's optimizer flags
    optimizer, optimizer_name = ncf.make_optimizer(model, defaults.learning_rate, (defaults.beta1, defaults.beta2),
                                                   defaults.eps)
    return sampler, model, optimizer, optimizer_name, precision.grad_scaler()


def time_training(args, sampler, train_model, optimizer, scaler, precision, batch_size, ctx):
    """Times of the epoch's shuffle, of the first step and of the later steps, and the last loss."""
    device = ctx.device
    # The epoch's shuffle happens when its first batch is asked for: timed on its own.
    sync(device)
    start = time.perf_counter()
    batches = sampler.epoch(1, batch_size, 0, 1, args.grads_accumulated)
    first = next(batches)
    sync(device)
    shuffle_s = time.perf_counter() - start
    steps = min(args.warmup + args.steps, sampler.steps_per_epoch(batch_size, 1))
    start = time.perf_counter()
    loss = ncf.train_step(train_model, optimizer, scaler, precision, *first, ctx)
    sync(device)
    first_step_s = time.perf_counter() - start
    step_times = []
    for step in range(1, steps):
        sync(device)
        start = time.perf_counter()
        micro_batches, global_size = next(batches)
        loss = ncf.train_step(train_model, optimizer, scaler, precision, micro_batches, global_size, ctx)
        sync(device)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
    return shuffle_s, first_step_s, sorted(step_times), float(loss)


def time_evaluation(args, model, precision, ctx):
    """(seconds of each timed evaluation, pairs scored per evaluation, HR@10) on random candidates."""
    device = ctx.device
    eval_users = min(args.eval_users or args.users, args.users)
    users = torch.arange(eval_users, dtype=torch.int32, device=device)
    candidates = torch.randint(args.items, (eval_users, args.candidates), dtype=torch.int32, device=device)
    test_data = TestData(users=users, candidates=candidates, total_samples=eval_users * args.candidates)
    topk = ncf.parse_args([]).topk
    # Warm-up; under --compile a whole evaluation, whose batch shapes are those the compiled code must have seen
    warm = test_data if args.compile else TestData(users[:1000], candidates[:1000], 1000 * args.candidates)
    ncf.evaluate(model, warm, topk, args.valid_batch_size, precision, ctx, compiled=args.compile)
    eval_times = []
    for _ in range(args.eval_repeats):
        sync(device)
        start = time.perf_counter()
        hr = ncf.evaluate(model, test_data, topk, args.valid_batch_size, precision, ctx, compiled=args.compile)["hr"]
        sync(device)
        eval_times.append(time.perf_counter() - start)
    return eval_times, test_data.total_samples, hr


def measure_one(args, batch_size, precision_name):
    """Train and eval throughput of one configuration, in this process."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    amp_dtype = "float16" if device.type == "cuda" else "bfloat16"
    precision = choose_precision("O2" if precision_name == "amp" else "O0", amp_dtype, device)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=device)
    sampler, model, optimizer, optimizer_name, scaler = build(args, device, precision)
    train_model = model
    if args.compile:
        train_model = ncf.compile_for_run(model)  # as ncf.py --compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shuffle_s, first_step_s, step_times, loss = time_training(args, sampler, train_model, optimizer, scaler,
                                                              precision, batch_size, ctx)
    step_s = step_times[len(step_times) // 2]  # median: the machine may be shared
    profile = profile_training(args, sampler, train_model, optimizer, scaler, precision, batch_size, ctx) \
        if args.profile else None
    eval_times, eval_samples, hr = time_evaluation(args, model, precision, ctx)
    eval_s = sorted(eval_times)[len(eval_times) // 2]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        name = f"cpu x{torch.get_num_threads()} threads"
    steps_per_epoch = sampler.steps_per_epoch(batch_size, 1)
    return {
        "device": args.device, "device_name": name, "precision": precision.name, "batch_size": batch_size,
        "grads_accumulated": args.grads_accumulated, "train_samples_per_s": batch_size / step_s,
        "epoch_samples_per_s": sampler.samples_per_epoch / (shuffle_s + steps_per_epoch * step_s),
        "eval_samples_per_s": eval_samples / eval_s,
        "peak_memory_bytes": peak, "peak_memory_kind": "max_allocated" if device.type == "cuda" else "max_rss",
        "step_s_median": step_s, "step_s_all": step_times, "shuffle_s": shuffle_s, "first_step_s": first_step_s,
        "compiled": args.compile, "eval_s": eval_s, "eval_s_all": eval_times,
        "eval_samples": eval_samples, "timed_steps": len(step_times), "loss": loss, "eval_hr": hr,
        "optimizer": optimizer_name, "malloc": allocator.in_use(), "torch": torch.__version__,
        **({"profile": profile} if profile else {}),
    }


def profile_training(args, sampler, train_model, optimizer, scaler, precision, batch_size, ctx):
    """The --profile operators of most self time over --steps training steps (forward, backward, optimizer
    and the sampler's batches, not the epoch's shuffle; fewer steps if the epoch is shorter):
    [{name, self_s, share, calls}], share of the steps' total self time."""
    batches = sampler.epoch(2, batch_size, 0, 1, args.grads_accumulated)
    first = next(batches)  # the epoch's shuffle (randperm) runs here, outside the profile: it is no step's work
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for micro_batches, global_size in itertools.chain([first], itertools.islice(batches, args.steps - 1)):
            ncf.train_step(train_model, optimizer, scaler, precision, micro_batches, global_size, ctx)
        sync(ctx.device)
    return top_operators(prof.key_averages(), ctx.device, args.profile)


def top_operators(events, device, count):
    """The `count` operators of most self time: CPU time on a CPU, device (kernel) time on CUDA, where the
    CPU's share is only the launches."""
    def self_us(e):
        return e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total

    events = sorted(events, key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1
    return [{"name": e.key, "self_s": self_us(e) / 1e6, "share": self_us(e) / total, "calls": e.count}
            for e in events[:count]]


def print_profiles(results):
    for r in results:
        if r.get("profile"):
            kind = "kernel" if r["device"] == "cuda" else "CPU"
            print(f"\nprofile, batch {r['batch_size']:,} {r['precision']} (up to --steps steps; self {kind} time):")
            for op in r["profile"]:
                print(f"  {op['name']:<40} {op['share']:>6.1%} {op['self_s']:>8.3f} s {op['calls']:>7} calls")


def per_sample_cost(args, micro_batch=None, device="cpu"):
    """(FLOPs, bytes) per training sample and per eval sample, and bytes per optimizer step (fp32).

    FLOPs: 2 per multiply-add; backward is twice the forward (input and weight gradients).
    Bytes: every activation and its gradient written once and read once; the embedding rows
    gathered and their gradients scattered. Per step: a dense Adam update reads param, grad, m, v
    and writes param, m, v, and the gradient is zeroed: 8 passes over every parameter.

    The FLOPs are those of the computation NeuMF runs: on the CPU, when a micro-batch has at least as
    many samples as the tables have rows, training computes the first MLP layer once per table row
    (NeuMF._forward_factored) rather than once per sample, and evaluation always splits it into a
    per-user and a per-item term (NeuMF.score_candidates). `recipe_train_flops` is the per-sample
    model's figure, for comparison.
    """
    sizes = args.layers
    first = sizes[0] * sizes[1] if len(sizes) > 1 else 0
    half = sizes[0] // 2
    macs = sum(a * b for a, b in itertools.pairwise(sizes)) + args.factors + sizes[-1] * 1
    factored = device == "cpu" and first and micro_batch is not None and micro_batch >= args.users + args.items
    train_flops = 6 * macs
    if factored:  # per sample without the first layer, plus the per-row terms shared by the micro-batch
        train_flops = 6 * (macs - first) + 6 * (args.users + args.items) * half * sizes[1] / micro_batch
    eval_flops = 2 * (macs - first) + 2 * half * sizes[1] / args.candidates  # the user term, once per user
    tail = sum(sizes[1:]) + args.factors + sizes[-1] + 1  # hidden layers, GMF product, output
    gathered = 2 * (sizes[1] + args.factors) if factored else 2 * (args.factors + half)
    params = (args.users + args.items) * (args.factors + half) + sum(
        a * b + b for a, b in itertools.pairwise(sizes)) + args.factors + sizes[-1] + 1
    return {"train_flops": train_flops, "recipe_train_flops": 6 * macs, "eval_flops": eval_flops,
            "train_bytes": (gathered + tail) * 4 * 2 * 2, "eval_bytes": (2 * (sizes[1] + args.factors) + tail) * 4 * 2,
            "step_bytes": params * 4 * 8, "params": params, "factored": bool(factored)}


def best_seconds(device, work, tries=5):
    """The shortest of `tries` timed runs of work()."""
    best = float("inf")
    for _ in range(tries):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(device, dtype, width=256, try_s=0.1):
    """FLOP/s of [rows, width] @ [width, width] matmuls in `dtype`, best of a few tries. The rows double
    from 4,096 until one product takes `try_s`: a CPU without native bf16 multiplies bf16 about 50x
    slower than fp32, and a fixed 262,144-row product then took 30 s a try. One untimed product first: on
    CUDA the first fp16 product loads its kernels (over `try_s`), which stopped the doubling at 4,096 rows,
    where launches dominate, and measured an H200's fp16 at 16 TFLOP/s, a tenth of its TF32."""
    w = torch.randn(width, width, device=device).to(dtype)
    rows = 4096
    best_seconds(device, functools.partial(torch.mm, torch.randn(rows, width, device=device).to(dtype), w), tries=1)
    while True:
        product = functools.partial(torch.mm, torch.randn(rows, width, device=device).to(dtype), w)
        if best_seconds(device, product, tries=1) >= try_s or rows >= 1 << 20:
            return 2 * rows * width * width / best_seconds(device, product)
        rows *= 2


def measure_floor(device):
    """The machine's fp32 matmul rate (FLOP/s; TF32 on CUDA, as training), its mixed-precision matmul rate
    (fp16 on CUDA, bf16 on CPU, for the AMP rows) and copy bandwidth (bytes/s), best of a few tries."""
    big = torch.ones(128 * 2**20, device=device)  # 512 MiB
    out = torch.zeros_like(big)
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"matmul_flops_per_s": matmul_rate(device, torch.float32),
            "copy_bytes_per_s": 2 * big.numel() * 4 / best_seconds(device, lambda: out.copy_(big)),
            "amp_matmul_flops_per_s": matmul_rate(device, low),
            "amp_matmul_dtype": str(low)}


def add_floor(r, args, floor, batch_size):
    """Lower bound on the time per sample: the larger of its matmul time (at the row's precision) and
    its memory time, with the dense optimizer step's traffic shared by the batch's samples."""
    rate = floor["matmul_flops_per_s"] if r["precision"] == "fp32" else floor["amp_matmul_flops_per_s"]
    run_cost = per_sample_cost(args, batch_size // args.grads_accumulated, args.device)
    r["train_flops_per_sample"] = run_cost["train_flops"]
    bytes_per_sample = run_cost["train_bytes"] + run_cost["step_bytes"] / batch_size
    seconds = max(run_cost["train_flops"] / rate, bytes_per_sample / floor["copy_bytes_per_s"])
    r["floor_train_samples_per_s"] = 1 / seconds
    r["fraction_of_floor"] = r["train_samples_per_s"] * seconds
    r["floor_eval_samples_per_s"] = 1 / max(run_cost["eval_flops"] / rate,
                                            run_cost["eval_bytes"] / floor["copy_bytes_per_s"])


def print_table(results, cost, floor):
    print(f"\n{'device':<6} {'precision':<16} {'batch':>9} {'accum':>5} {'train/s':>12} {'epoch/s':>12} "
          f"{'eval/s':>12} {'peak GB':>8} {'floor/s':>10} {'of floor':>8}")
    for r in results:
        line = (f"{r['device']:<6} {r['precision']:<16} {r['batch_size']:>9,} {r['grads_accumulated']:>5} "
                f"{r['train_samples_per_s']:>12,.0f} {r['epoch_samples_per_s']:>12,.0f} "
                f"{r['eval_samples_per_s']:>12,.0f} {r['peak_memory_bytes'] / 1e9:>8.2f}")
        if floor:
            line += f" {r['floor_train_samples_per_s']:>10,.0f} {r['fraction_of_floor']:>8.1%}"
        print(line)
    print(f"\nper training sample: {cost['recipe_train_flops'] / 1e3:.0f} kFLOP in the per-sample model, "
          f"{cost['train_bytes'] / 1e3:.1f} kB of activations; per eval sample {cost['eval_flops'] / 1e3:.0f} "
          f"kFLOP (factored); per optimizer step {cost['step_bytes'] / 1e9:.2f} GB (dense Adam over "
          f"{cost['params'] / 1e6:.1f}M parameters)")
    for r in results:
        if floor and r["train_flops_per_sample"] != cost["recipe_train_flops"]:
            print(f"batch {r['batch_size']:,}: first MLP layer factored per table row, "
                  f"{r['train_flops_per_sample'] / 1e3:.0f} kFLOP per training sample")
    if floor:
        print(f"measured: fp32 matmul {floor['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"{floor['amp_matmul_dtype']} matmul {floor['amp_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, copy bandwidth "
              f"{floor['copy_bytes_per_s'] / 1e9:.1f} GB/s")


def run_child(argv, args, floor, batch_size, precision):
    """One configuration in its own process (its peak memory is its own); its JSON record."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", str(batch_size), precision]
    proc = subprocess.run(cmd, capture_output=True, check=False, encoding="utf-8")
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode < 0 else ""
        raise cli.EnvironmentFailure(f"batch {batch_size} {precision} failed with exit status {proc.returncode}"
                                     f"{killed}: {last}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if floor:
        add_floor(r, args, floor, batch_size)
    print(json.dumps(r), flush=True)
    return r


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    validate(args)
    if args.json_out and not args.child:
        check_may_write(args.json_out, "--json_out", is_throughput_log, "a throughput log")
    matmuls = set_matmul_precision(torch.device(args.device))  # as ncf.py: TF32 on CUDA, as the recipe
    print(f"fp32 matmuls: {matmuls}", flush=True)
    if args.child:
        print(json.dumps(measure_one(args, int(args.child[0]), args.child[1])), flush=True)
        return
    cost = per_sample_cost(args)
    floor = {} if args.no_floor else measure_floor(torch.device(args.device))
    results = [run_child(argv, args, floor, batch_size, precision)
               for batch_size in args.batch_size for precision in args.precision]
    print_table(results, cost, floor)
    print_profiles(results)
    print(json.dumps({"floor": {**cost, **floor}}))
    if args.json_out:
        with open_owned_for_append(args.json_out, "--json_out", is_throughput_log, "a throughput log") as f:
            for r in results:
                f.write(json.dumps({"created_by": CREATED_BY, **r, "floor": {**cost, **floor}}) + "\n")


if __name__ == "__main__":
    main()
