"""Host synchronisations in ncf.py's training step and evaluations (run by gpu_check.sh).

    python benchmarks/sync_check.py --data data/cache/synthetic --device cuda

On CUDA, three training steps (after one warm-up step), a sampled evaluation and a full-ranking
evaluation run under torch.cuda.set_sync_debug_mode("warn"), and every synchronisation torch reports is
printed with the phase it happened in. Expected: none in the training steps, one read at the end of
each evaluation. Exit status 1 when a phase syncs more than that. On a CPU (`--device cpu`,
gpu_check.sh's dry run) the same code runs without detection; `--device cuda` (the default) on a machine
without CUDA is one line and exit status 2, like any bad input.
"""
import itertools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: I001  (sets the OpenMP wait policy before torch loads OpenMP)

import torch

import ncf
from cli import UserError, main_guard
from dataloading import EpochSampler, FullRankingData, TestData, load_cache
from devices import choose_precision, pick_device
from neumf import build_model

EXPECTED = {"3 training steps": 0, "sampled evaluation": 1, "full-ranking evaluation": 1}
# What torch warns at each synchronising call under set_sync_debug_mode("warn"). Its other warning there,
# "Synchronization debug mode is a prototype feature ...", comes once, with whichever phase runs first, and
# is no sync: counted as one, it failed the training steps on the first H200 run (2026-12-04).
SYNC_MESSAGE = "called a synchronizing CUDA operation"


def syncs_of(device, work):
    """(syncs torch reported while `work()` ran, their messages); None on a CPU."""
    if device.type != "cuda":
        work()
        return None, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            work()
            torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = sync_messages(str(w.message) for w in caught)
    return len(messages), messages


def sync_messages(warning_texts):
    """The first line of each warning that reports a host synchronisation."""
    return [text.splitlines()[0] for text in warning_texts if SYNC_MESSAGE in text]


@main_guard
def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset cache folder (ncf.py --data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cuda",
                   help="cuda without a CUDA device is refused (exit 2); cpu runs the steps without sync detection")
    p.add_argument("--batch_size", type=int, default=65536, help="samples per training step")
    args = p.parse_args(argv)
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    device = pick_device(args.device)
    cache = load_cache(args.data)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=device)
    defaults = ncf.parse_args([])
    precision = choose_precision(defaults.opt_level, defaults.amp_dtype, device)
    model = build_model(ncf.model_config(defaults, cache), device)
    optimizer, _ = ncf.make_optimizer(model, defaults.learning_rate, (defaults.beta1, defaults.beta2), defaults.eps)
    scaler = precision.grad_scaler()
    sampler = EpochSampler(cache.train, cache.num_items, defaults.negative_samples, device, defaults.seed)
    if (available := sampler.steps_per_epoch(args.batch_size, 1)) < 4:  # else "3 training steps: 0 syncs, ok" for less
        raise UserError(f"--batch_size {args.batch_size:,}: an epoch of this cache has {available} step(s) of it, and "
                        f"the check needs 4 (one to warm up, three checked): choose a smaller --batch_size")
    batches = sampler.epoch(1, args.batch_size, 0, 1, 1)
    model.train()
    ncf.train_step(model, optimizer, scaler, precision, *next(batches), ctx)  # warm-up: allocations, kernels
    steps = list(itertools.islice(batches, 3))
    test_data = TestData.from_cache(cache, device)
    full_data = FullRankingData.from_cache(cache, device)
    phases = {
        "3 training steps": lambda: [ncf.train_step(model, optimizer, scaler, precision, *b, ctx) for b in steps],
        "sampled evaluation": lambda: ncf.evaluate(model, test_data, 10, 1 << 20, precision, ctx),
        "full-ranking evaluation": lambda: ncf.evaluate_full_ranking(model, full_data, 10, 1 << 20, precision, ctx),
    }
    failed = False
    print(f"device {device} | precision {precision.name} | {len(steps)} steps of {args.batch_size:,} samples")
    for phase, work in phases.items():
        count, messages = syncs_of(device, work)
        if count is None:
            print(f"{phase}: ran (no sync detection on {device.type})")
            continue
        ok = count <= EXPECTED[phase]
        failed |= not ok
        print(f"{phase}: {count} host sync(s), expected at most {EXPECTED[phase]}: {'ok' if ok else 'TOO MANY'}")
        for message in messages:
            print(f"    {message}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
