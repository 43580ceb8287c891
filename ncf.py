"""Train NeuMF on MovieLens and report HR@k / NDCG@k, as NVIDIA's NCF recipe does.

One process (CPU or one GPU):
    python ncf.py --data data/cache/ml-20m
All GPUs of one machine:
    torchrun --standalone --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
Several machines (run on each, same HOST:PORT):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        ncf.py --data /data/cache/ml-20m
Evaluate a checkpoint:
    python ncf.py --data /data/cache/ml-20m --mode test --load_checkpoint_path /data/checkpoints/model.pth
"""
import cli  # noqa: F401, I001  (first: sets the OpenMP wait policy before torch loads)

import argparse
import contextlib
import datetime
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint
from cli import UserError, main_guard, remove_stale_temporaries
from dataloading import EpochSampler, FullRankingData, TestData, load_cache
from devices import Precision, choose_precision, pick_device
from logger import RunLogger
from metrics import full_ranks, rank_metric_sums, sampled_ranks
from neumf import DROPOUT, FACTORS, LAYERS, ItemPopularity, build_model

DATA_DIR = os.environ.get("DATA_DIR", "./data")
BEST_CHECKPOINT = "model.pth"  # the best epoch's model
LAST_CHECKPOINT = "last.pth"  # the last epoch's full state, for --resume
# Flags that define the model's shape: on --resume the checkpoint's values win.
ARCHITECTURE_FLAGS = ("factors", "layers")
# Flags that change the optimisation: on --resume a difference is allowed, with a warning.
TRAINING_FLAGS = (
    "batch_size", "negative_samples", "learning_rate", "beta1", "beta2", "eps", "dropout",
    "grads_accumulated", "opt_level", "amp_dtype", "seed",
)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a Neural Collaborative Filtering (NeuMF) model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=os.path.join(DATA_DIR, "cache", "ml-20m"),
                   help="folder of the dataset cache written by prepare_dataset.sh / convert.py")
    p.add_argument("-e", "--epochs", type=int, default=30, help="number of epochs to train")
    p.add_argument("-b", "--batch_size", type=int, default=1048576,
                   help="global batch size (samples per optimizer step, over all processes)")
    p.add_argument("--valid_batch_size", type=int, default=1048576,
                   help="samples (user-item pairs) scored per evaluation batch")
    p.add_argument("-f", "--factors", type=int, default=FACTORS, help="GMF embedding size (predictive factors)")
    p.add_argument("--layers", nargs="+", type=int, default=list(LAYERS),
                   help="MLP layer sizes; the first is split between user and item embeddings")
    p.add_argument("-n", "--negative_samples", type=int, default=4, help="negatives per positive in training")
    p.add_argument("-l", "--learning_rate", type=float, default=0.0045, help="Adam learning rate")
    p.add_argument("-k", "--topk", type=int, default=10, help="rank cut-off k of HR@k and NDCG@k")
    p.add_argument("-t", "--threshold", type=float, default=1.0, help="stop training once HR@k reaches this")
    p.add_argument("--beta1", type=float, default=0.25, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.5, help="Adam beta2")
    p.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="dropout after each MLP hidden layer")
    p.add_argument("--checkpoint_dir", default=os.path.join(DATA_DIR, "checkpoints"),
                   help="where model.pth (best epoch) and last.pth (for --resume) are written")
    p.add_argument("--load_checkpoint_path", "--checkpoint-path", dest="load_checkpoint_path", default=None,
                   help="model checkpoint to evaluate (--mode test) or to start training from")
    p.add_argument("--mode", choices=("train", "test"), default="train",
                   help="train, or only evaluate the checkpoint (default: CHECKPOINT_DIR/model.pth)")
    p.add_argument("--grads_accumulated", type=int, default=1,
                   help="split each global batch into this many micro-batches (same result, less memory)")
    p.add_argument("--opt_level", choices=("O0", "O2"), default="O2",
                   help="O2: mixed precision (fp16 + loss scaling on CUDA, bf16 on CPU); O0: fp32")
    p.add_argument("--amp", dest="opt_level", action="store_const", const="O2", help="same as --opt_level O2")
    p.add_argument("--amp_dtype", choices=("auto", "float16", "bfloat16"), default="auto",
                   help="mixed-precision type; auto: float16 on CUDA, bfloat16 on CPUs with native bf16 "
                        "(others fall back to fp32)")
    p.add_argument("-s", "--seed", type=int, default=1, help="random seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--log_path", default=None, help="append the run's figures here as JSON lines")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINT_DIR/last.pth")
    p.add_argument("--full_ranking", action="store_true",
                   help="also report HR@k/NDCG@k against every item the user has not trained on")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by torch.distributed.launch; the LOCAL_RANK environment variable wins")
    return p.parse_args(argv)


def validate_args(args):
    """Checks that need nothing but the flags; each message names the flag and the fix."""
    positive = {
        "--epochs": args.epochs, "--batch_size": args.batch_size, "--valid_batch_size": args.valid_batch_size,
        "--factors": args.factors, "--negative_samples": args.negative_samples, "--topk": args.topk,
        "--grads_accumulated": args.grads_accumulated, "--learning_rate": args.learning_rate, "--eps": args.eps,
    }
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if any(size <= 0 for size in args.layers):
        raise UserError(f"--layers sizes must be positive, got {args.layers}")
    if args.layers[0] % 2:
        raise UserError(f"--layers: the first size is split between user and item embeddings, so it must be "
                        f"even, got {args.layers[0]}")
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if not 0.0 <= args.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.batch_size % args.grads_accumulated:
        raise UserError(f"--batch_size {args.batch_size} is not divisible by --grads_accumulated "
                        f"{args.grads_accumulated}: choose sizes that divide")


def check_writable(folder, flag):
    """Fail early if `folder` could not be created or written; creates nothing (no partial output)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} {folder} cannot be created: {existing} is a file; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder} is not writable ({existing} refuses new files); choose another {flag}")


# ---------------------------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(device_flag, local_rank_flag):
    """One set-up for one process and for torchrun: reads the launcher's environment."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", local_rank_flag or 0))
    device = pick_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        # A finite timeout turns a dead or stuck peer into an error instead of a hang.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def make_optimizer(model, learning_rate, betas, eps):
    """Adam with the fused kernel where this torch has it for the device, else the foreach one."""
    kwargs = dict(lr=learning_rate, betas=betas, eps=eps)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs), "torch.optim.Adam(fused=True)"
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), foreach=True, **kwargs), "torch.optim.Adam(foreach=True)"


def model_config(args, cache):
    return {"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": args.factors,
            "mlp_layer_sizes": list(args.layers), "dropout": args.dropout}


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def train_step(model, optimizer, scaler, precision, micro_batches, global_size, ctx):
    """One optimizer step over one global batch; returns its loss as a device tensor (no host sync)."""
    # Each micro-batch contributes its share of the mean over the global batch; DDP then
    # averages over ranks, hence the world_size factor.
    scale = ctx.world_size / global_size
    loss_sum = 0.0
    for i, (users, items, labels) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = model.no_sync() if ctx.distributed and not last else contextlib.nullcontext()
        with no_sync:
            with precision.autocast():
                logits = model(users, items)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") * scale
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def train_epoch(model, optimizer, scaler, precision, sampler, epoch, batch_size, grads_accumulated, ctx,
                progress=False):
    """One epoch of training; returns (mean loss of the global batches, samples trained on).

    The loss is summed on the device and read once at the end: no host round trip per batch.
    """
    model.train()
    loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
    steps = samples = 0
    batches = sampler.epoch(epoch, batch_size, ctx.rank, ctx.world_size, grads_accumulated)
    total = sampler.steps_per_epoch(batch_size, ctx.world_size * grads_accumulated)
    for micro_batches, global_size in tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress,
                                           leave=False, unit="step"):
        loss_sum += train_step(model, optimizer, scaler, precision, micro_batches, global_size, ctx)
        steps += 1
        samples += global_size
    if ctx.distributed:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (ctx.world_size * steps), samples


@torch.no_grad()
def evaluate(model, test_data, topk, batch_size, precision, ctx):
    """Sampled HR@k and NDCG@k over all test users (each rank scores its share); returns (hr, ndcg).

    `batch_size` bounds the user-candidate pairs scored at once (--valid_batch_size).
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # hits, ndcg, users
    users_per_batch = max(1, batch_size // test_data.num_candidates)
    # A model may score a user's candidates together (NeuMF shares the user's work between them).
    score = getattr(model, "score_candidates", None) or (
        lambda users, candidates: model(users[:, None].expand_as(candidates).reshape(-1),
                                        candidates.reshape(-1)).view(candidates.shape))
    for start in range(0, test_data.users.shape[0], users_per_batch):
        candidates = test_data.candidates[start : start + users_per_batch]
        users = test_data.users[start : start + users_per_batch]
        with precision.autocast():
            scores = score(users, candidates)
        hits, ndcg = rank_metric_sums(sampled_ranks(scores), topk)
        sums += torch.stack((hits, ndcg, torch.tensor(float(candidates.shape[0]), device=ctx.device)))
    return _all_reduce_means(sums, ctx)


@torch.no_grad()
def evaluate_full_ranking(model, data, topk, batch_size, precision, ctx):
    """HR@k and NDCG@k against every item the user has not trained on, in bounded user chunks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    items = torch.arange(data.num_items, device=ctx.device, dtype=torch.int32)
    users_per_chunk = max(1, batch_size // data.num_items)
    for lo in range(0, data.users.shape[0], users_per_chunk):
        users = data.users[lo : lo + users_per_chunk]
        with precision.autocast():
            scores = model(users.repeat_interleave(data.num_items), items.repeat(users.shape[0]))
        rows, excluded = data.train_pairs_of(lo, lo + users.shape[0])
        ranks = full_ranks(scores.view(users.shape[0], -1), data.positives[lo : lo + users.shape[0]], rows, excluded)
        hits, ndcg = rank_metric_sums(ranks, topk)
        sums += torch.stack((hits, ndcg, torch.tensor(float(users.shape[0]), device=ctx.device)))
    return _all_reduce_means(sums, ctx)


def _all_reduce_means(sums, ctx):
    """[sum_a, sum_b, count] over all ranks -> (sum_a / count, sum_b / count): reduce sums, divide once."""
    if ctx.distributed:
        dist.all_reduce(sums)
    hr, ndcg = (sums[:2] / sums[2]).tolist()
    return hr, ndcg


def run_evaluation(model, test_data, full_data, topk, batch_size, precision, ctx):
    """Timed evaluation; returns a record of the figures (full-ranking ones when asked for)."""
    start = time.perf_counter()
    hr, ndcg = evaluate(model, test_data, topk, batch_size, precision, ctx)
    seconds = time.perf_counter() - start
    # Ranks score their shares at the same time, so the global count over one rank's time.
    record = {"hr": hr, "ndcg": ndcg, "eval_time_s": seconds,
              "eval_throughput": test_data.total_samples / seconds}
    if full_data is not None:
        record["full_hr"], record["full_ndcg"] = evaluate_full_ranking(model, full_data, topk, batch_size,
                                                                       precision, ctx)
    return record


def resolved_resume_args(args, saved_args):
    """The flags of a resumed run: a new namespace, with a warning for every flag that differs from
    last.pth's saying which value wins (the checkpoint's for the model's shape, this command line's else)."""
    resolved = vars(args).copy()
    for name in ARCHITECTURE_FLAGS:
        if getattr(args, name) != saved_args[name]:
            warnings.warn(f"--resume: --{name} is {getattr(args, name)} here but {saved_args[name]} in last.pth; "
                          f"the checkpoint's value wins (the model's shape cannot change)", stacklevel=2)
            resolved[name] = saved_args[name]
    for name in TRAINING_FLAGS:
        if getattr(args, name) != saved_args.get(name):
            warnings.warn(f"--resume: --{name} is {getattr(args, name)} here but {saved_args.get(name)} in "
                          f"last.pth; this command line's value wins", stacklevel=2)
    return argparse.Namespace(**resolved)


# ---------------------------------------------------------------------------------------------
# Main


class StopRequest:
    """Records SIGTERM (what schedulers send before preempting); training stops after the epoch."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, ctx):
        """True on every rank if any rank was asked to stop (one tiny all-reduce per epoch)."""
        flag = torch.tensor([float(self.requested)], device=ctx.device)
        if ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def print_setup(log, ctx, precision, optimizer_name, cache, args, steps):
    per_rank = args.batch_size // ctx.world_size
    log.info(
        f"device {ctx.device} | world size {ctx.world_size} | precision {precision.name} ({args.opt_level}) | "
        f"optimizer {optimizer_name}\n"
        f"dataset {args.data}: {cache.num_users:,} users, {cache.num_items:,} items, "
        f"{cache.train.shape[0]:,} train positives, {cache.test.shape[0]:,} test users x "
        f"{1 + cache.test_negatives.shape[1]} candidates\n"
        f"global batch {args.batch_size:,} | per rank {per_rank:,} | micro-batch "
        f"{per_rank // args.grads_accumulated:,} | steps per epoch {steps:,}"
    )


def evaluation_data(cache, full_ranking, ctx):
    """This rank's sampled-evaluation data, and its full-ranking data when asked for (else None)."""
    test_data = TestData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size)
    full_data = FullRankingData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size) if full_ranking else None
    return test_data, full_data


def test_mode(args, ctx, cache, log):
    path = args.load_checkpoint_path or os.path.join(args.checkpoint_dir, BEST_CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--mode test needs a checkpoint, and {path} does not exist: pass --load_checkpoint_path "
                        f"(or train first)")
    model, ckpt = checkpoint.load_model(path, cache, ctx.device)
    precision = choose_precision(args.opt_level, args.amp_dtype, ctx.device)
    log.info(f"device {ctx.device} | world size {ctx.world_size} | precision {precision.name} | checkpoint {path} "
             f"(epoch {ckpt.get('epoch')})")
    test_data, full_data = evaluation_data(cache, args.full_ranking, ctx)
    log.log("test", **run_evaluation(model, test_data, full_data, args.topk, args.valid_batch_size, precision, ctx))


@dataclass
class Training:
    """What a training run works with: built fresh, or restored from last.pth for --resume."""

    args: argparse.Namespace  # the run's flags (for --resume, reconciled with last.pth's)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    precision: Precision
    scaler: torch.amp.GradScaler
    state: dict  # progress: epoch done, best figures, throughputs, elapsed time


def build_training(args, ctx, cache, last_path):
    torch.manual_seed(args.seed)
    resumed = None
    if args.resume:
        if not os.path.isfile(last_path):
            raise UserError(f"--resume: {last_path} does not exist: run without --resume, or pass the "
                            f"--checkpoint_dir of the run to continue")
        resumed = checkpoint.load_checkpoint(last_path, cache, "--resume checkpoint")
        args = resolved_resume_args(args, resumed["args"])
    model = build_model(model_config(args, cache), ctx.device)
    if args.load_checkpoint_path and not resumed:
        start = checkpoint.load_checkpoint(args.load_checkpoint_path, cache)
        checkpoint.load_model_weights(model, start, args.load_checkpoint_path)
    precision = choose_precision(args.opt_level, args.amp_dtype, ctx.device)
    optimizer, optimizer_name = make_optimizer(model, args.learning_rate, (args.beta1, args.beta2), args.eps)
    scaler = precision.grad_scaler()
    state = {"epoch": 0, "best_hr": -1.0, "best_ndcg": 0.0, "best_epoch": 0, "time_to_target_s": None,
             "best_train_throughput": 0.0, "best_eval_throughput": 0.0, "elapsed_s": 0.0}
    if resumed:
        checkpoint.load_model_weights(model, resumed, last_path)
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        state.update(resumed["state"])
        checkpoint.restore_rng_states(resumed["rng"], ctx)
    else:
        # Same initial weights on every rank (DDP also broadcasts them), then per-rank dropout streams.
        torch.manual_seed(args.seed + ctx.rank)
    return Training(args, model, optimizer, optimizer_name, precision, scaler, state)


def update_progress(state, record, epoch, elapsed_s, threshold):
    """Fold an epoch's record into the run's progress; returns (new best epoch?, threshold reached?)."""
    state["epoch"] = epoch
    state["elapsed_s"] = elapsed_s
    state["best_train_throughput"] = max(state["best_train_throughput"], record["train_throughput"])
    state["best_eval_throughput"] = max(state["best_eval_throughput"], record["eval_throughput"])
    improved = record["hr"] > state["best_hr"]
    if improved:
        state.update(best_hr=record["hr"], best_ndcg=record["ndcg"], best_epoch=epoch)
    reached = record["hr"] >= threshold
    if reached and state["time_to_target_s"] is None:
        state["time_to_target_s"] = elapsed_s
    return improved, reached


def save_checkpoints(run, cache, ctx, epoch, record, improved, folder):
    """model.pth when the epoch is the best so far, and last.pth (for --resume) every epoch; rank 0 writes."""
    rngs = checkpoint.rng_states(ctx)  # a collective: every rank takes part
    if not ctx.is_main:
        return
    best = checkpoint.payload(run.model, vars(run.args), checkpoint.dataset_identity(cache), epoch, record)
    if improved:
        checkpoint.save_atomic(best, os.path.join(folder, BEST_CHECKPOINT))
    last = {**best, "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "state": dict(run.state), "rng": rngs}
    checkpoint.save_atomic(last, os.path.join(folder, LAST_CHECKPOINT))


def train_one_epoch_and_evaluate(run, train_model, sampler, eval_data, epoch, ctx, progress):
    """Train one epoch, stop on a non-finite loss, evaluate; returns the epoch's record."""
    args = run.args
    start = time.perf_counter()
    loss, samples = train_epoch(train_model, run.optimizer, run.scaler, run.precision, sampler, epoch,
                                args.batch_size, args.grads_accumulated, ctx, progress)
    train_time = time.perf_counter() - start
    if not math.isfinite(loss):
        raise UserError(f"training diverged: the mean loss of epoch {epoch} is {loss}; lower --learning_rate "
                        f"(now {args.learning_rate}) or resume from an earlier last.pth")
    record = {"epoch": epoch, "loss": loss, "train_time_s": train_time, "train_throughput": samples / train_time}
    record.update(run_evaluation(run.model, *eval_data, args.topk, args.valid_batch_size, run.precision, ctx))
    return record


def log_start(log, run, ctx, cache, sampler, test_data):
    """The set-up figures, and the item-popularity baseline the model must beat."""
    args = run.args
    steps = sampler.steps_per_epoch(args.batch_size, ctx.world_size * args.grads_accumulated)
    print_setup(log, ctx, run.precision, run.optimizer_name, cache, args, steps)
    popularity_hr, popularity_ndcg = evaluate(ItemPopularity(sampler.items, cache.num_items), test_data, args.topk,
                                              args.valid_batch_size, run.precision, ctx)
    log.info(f"item-popularity baseline: HR@{args.topk} {popularity_hr:.4f} | NDCG@{args.topk} {popularity_ndcg:.4f}")
    if run.state["epoch"] > 0:
        log.info(f"resumed from {os.path.join(args.checkpoint_dir, LAST_CHECKPOINT)} after epoch "
                 f"{run.state['epoch']}")
    log.write("config", args=vars(args), world_size=ctx.world_size, device=str(ctx.device),
              precision=run.precision.name, optimizer=run.optimizer_name, popularity_hr=popularity_hr,
              popularity_ndcg=popularity_ndcg)


def train_mode(args, ctx, cache, log):
    last_path = os.path.join(args.checkpoint_dir, LAST_CHECKPOINT)
    if ctx.is_main:
        for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
            remove_stale_temporaries(os.path.join(args.checkpoint_dir, name))
    run = build_training(args, ctx, cache, last_path)
    args, state = run.args, run.state
    train_model = DistributedDataParallel(run.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else run.model
    sampler = EpochSampler(cache.train, cache.num_items, args.negative_samples, ctx.device, args.seed)
    eval_data = evaluation_data(cache, args.full_ranking, ctx)
    log_start(log, run, ctx, cache, sampler, eval_data[0])

    stop = StopRequest()
    progress = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    run_start = time.perf_counter() - state["elapsed_s"]
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        record = train_one_epoch_and_evaluate(run, train_model, sampler, eval_data, epoch, ctx, progress)
        log.log("epoch", **record)
        improved, reached = update_progress(state, record, epoch, time.perf_counter() - run_start, args.threshold)
        save_checkpoints(run, cache, ctx, epoch, record, improved, args.checkpoint_dir)
        if reached:
            log.info(f"HR@{args.topk} {record['hr']:.4f} reached --threshold {args.threshold}: stopping")
            break
        if stop.agreed(ctx):
            log.info(f"stopped by SIGTERM after epoch {epoch}; {last_path} is saved: continue with --resume")
            break
    log.log("summary", best_hr=state["best_hr"], best_ndcg=state["best_ndcg"], best_epoch=state["best_epoch"],
            time_to_target_s=state["time_to_target_s"], best_train_throughput=state["best_train_throughput"],
            best_eval_throughput=state["best_eval_throughput"])


@main_guard
def main(argv=None):
    args = parse_args(argv)
    validate_args(args)
    ctx = setup_distributed(args.device, args.local_rank)
    log = None
    try:
        if args.batch_size % (ctx.world_size * args.grads_accumulated):
            raise UserError(f"--batch_size {args.batch_size} is not divisible by world size {ctx.world_size} x "
                            f"--grads_accumulated {args.grads_accumulated}: choose a multiple of "
                            f"{ctx.world_size * args.grads_accumulated}")
        if ctx.is_main:
            if args.mode == "train":
                check_writable(args.checkpoint_dir, "--checkpoint_dir")
            if args.log_path:
                check_writable(os.path.dirname(os.path.abspath(args.log_path)), "--log_path")
                if os.path.isdir(args.log_path):
                    raise UserError(f"--log_path {args.log_path} is a folder: give a file name")
        cache = load_cache(args.data)
        candidates = cache.test_negatives.shape[1] + 1
        if args.topk > candidates and not args.full_ranking:
            raise UserError(f"--topk {args.topk} is larger than the {candidates} candidates per test user: "
                            f"choose --topk <= {candidates}")
        log = RunLogger(args.log_path, enabled=ctx.is_main, k=args.topk)
        if args.mode == "test":
            test_mode(args, ctx, cache, log)
        else:
            train_mode(args, ctx, cache, log)
    finally:
        if log is not None:
            log.close()
        if ctx.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
