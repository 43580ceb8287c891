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

from cli import UserError, main_guard, remove_stale_temporaries
from dataloading import EpochSampler, FullRankingData, TestData, load_cache, safe_load
from logger import RunLogger
from metrics import full_ranks, rank_metric_sums, sampled_ranks
from neumf import ItemPopularity, NeuMF

DATA_DIR = os.environ.get("DATA_DIR", "./data")
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
    p.add_argument("-f", "--factors", type=int, default=64, help="GMF embedding size (predictive factors)")
    p.add_argument("--layers", nargs="+", type=int, default=[256, 256, 128, 64],
                   help="MLP layer sizes; the first is split between user and item embeddings")
    p.add_argument("-n", "--negative_samples", type=int, default=4, help="negatives per positive in training")
    p.add_argument("-l", "--learning_rate", type=float, default=0.0045, help="Adam learning rate")
    p.add_argument("-k", "--topk", type=int, default=10, help="rank cut-off k of HR@k and NDCG@k")
    p.add_argument("-t", "--threshold", type=float, default=1.0, help="stop training once HR@k reaches this")
    p.add_argument("--beta1", type=float, default=0.25, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.5, help="Adam beta2")
    p.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout after each MLP hidden layer")
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
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu")
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
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            f"use --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        # A finite timeout turns a dead or stuck peer into an error instead of a hang.
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=device if use_cuda else None,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


@dataclass(frozen=True)
class Precision:
    """Mixed precision as two objects, so the training loop has no branches: autocast and a scaler."""

    name: str
    dtype: torch.dtype  # None for fp32
    device_type: str

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def grad_scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def cpu_has_native_bf16():
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def choose_precision(opt_level, amp_dtype, device):
    if opt_level == "O0":
        return Precision("fp32", None, device.type)
    if amp_dtype == "auto":
        if device.type == "cuda":
            amp_dtype = "float16"  # the recipe's choice
        elif cpu_has_native_bf16():
            amp_dtype = "bfloat16"
        else:
            warnings.warn("--opt_level O2: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is "
                          "slower than fp32; training in fp32. Use --amp_dtype bfloat16 to force bf16.",
                          stacklevel=2)
            return Precision("fp32", None, device.type)
    dtype = getattr(torch, amp_dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--amp_dtype float16 is for CUDA; on CPU use --amp_dtype bfloat16 or auto")
    return Precision({torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] + " autocast", dtype, device.type)


def make_optimizer(model, args, device):
    """Adam with the fused kernel where this torch has it for the device, else the foreach one."""
    kwargs = dict(lr=args.learning_rate, betas=(args.beta1, args.beta2), eps=args.eps)
    try:
        return torch.optim.Adam(model.parameters(), fused=True, **kwargs), "torch.optim.Adam(fused=True)"
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), foreach=True, **kwargs), "torch.optim.Adam(foreach=True)"


def build_model(config, device):
    return NeuMF(
        nb_users=config["nb_users"], nb_items=config["nb_items"], mf_dim=config["mf_dim"],
        mlp_layer_sizes=config["mlp_layer_sizes"], dropout=config["dropout"],
    ).to(device)


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


def train_epoch(model, optimizer, scaler, precision, sampler, epoch, args, ctx, progress=False):
    """One epoch of training; returns (mean loss of the global batches, samples trained on).

    The loss is summed on the device and read once at the end: no host round trip per batch.
    """
    model.train()
    loss_sum = torch.zeros((), device=ctx.device, dtype=torch.float32)
    steps = samples = 0
    batches = sampler.epoch(epoch, args.batch_size, ctx.rank, ctx.world_size, args.grads_accumulated)
    total = sampler.steps_per_epoch(args.batch_size, ctx.world_size * args.grads_accumulated)
    for micro_batches, global_size in tqdm(batches, total=total, desc=f"epoch {epoch}", disable=not progress,
                                           leave=False, unit="step"):
        loss_sum += train_step(model, optimizer, scaler, precision, micro_batches, global_size, ctx)
        steps += 1
        samples += global_size
    if ctx.distributed:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (ctx.world_size * steps), samples


@torch.no_grad()
def evaluate(model, test_data, args, precision, ctx):
    """Sampled HR@k and NDCG@k over all test users (each rank scores its share); returns (hr, ndcg)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # hits, ndcg, users
    users_per_batch = max(1, args.valid_batch_size // test_data.num_candidates)
    # A model may score a user's candidates together (NeuMF shares the user's work between them).
    score = getattr(model, "score_candidates", None) or (
        lambda users, candidates: model(users[:, None].expand_as(candidates).reshape(-1),
                                        candidates.reshape(-1)).view(candidates.shape))
    for start in range(0, test_data.users.shape[0], users_per_batch):
        candidates = test_data.candidates[start : start + users_per_batch]
        users = test_data.users[start : start + users_per_batch]
        with precision.autocast():
            scores = score(users, candidates)
        hits, ndcg = rank_metric_sums(sampled_ranks(scores), args.topk)
        sums += torch.stack((hits, ndcg, torch.tensor(float(candidates.shape[0]), device=ctx.device)))
    return _all_reduce_means(sums, ctx)


@torch.no_grad()
def evaluate_full_ranking(model, data, args, precision, ctx):
    """HR@k and NDCG@k against every item the user has not trained on, in bounded user chunks."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    items = torch.arange(data.num_items, device=ctx.device, dtype=torch.int32)
    users_per_chunk = max(1, args.valid_batch_size // data.num_items)
    for lo in range(0, data.users.shape[0], users_per_chunk):
        users = data.users[lo : lo + users_per_chunk]
        with precision.autocast():
            scores = model(users.repeat_interleave(data.num_items), items.repeat(users.shape[0]))
        rows, excluded = data.train_pairs_of(lo, lo + users.shape[0])
        ranks = full_ranks(scores.view(users.shape[0], -1), data.positives[lo : lo + users.shape[0]], rows, excluded)
        hits, ndcg = rank_metric_sums(ranks, args.topk)
        sums += torch.stack((hits, ndcg, torch.tensor(float(users.shape[0]), device=ctx.device)))
    return _all_reduce_means(sums, ctx)


def _all_reduce_means(sums, ctx):
    """[sum_a, sum_b, count] over all ranks -> (sum_a / count, sum_b / count): reduce sums, divide once."""
    if ctx.distributed:
        dist.all_reduce(sums)
    hr, ndcg = (sums[:2] / sums[2]).tolist()
    return hr, ndcg


def run_evaluation(model, test_data, full_data, args, precision, ctx):
    """Timed evaluation; returns a record of the figures (full-ranking ones when asked for)."""
    start = time.perf_counter()
    hr, ndcg = evaluate(model, test_data, args, precision, ctx)
    seconds = time.perf_counter() - start
    # Ranks score their shares at the same time, so the global count over one rank's time.
    record = {"hr": hr, "ndcg": ndcg, "eval_time_s": seconds,
              "eval_throughput": test_data.total_samples / seconds}
    if full_data is not None:
        record["full_hr"], record["full_ndcg"] = evaluate_full_ranking(model, full_data, args, precision, ctx)
    return record


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, cache, what="checkpoint"):
    """Load a checkpoint (tensors and plain data only) and check it matches the dataset, if given."""
    ckpt = safe_load(path, what, "pass a checkpoint written by ncf.py (--load_checkpoint_path), or train first")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{what} {path} is not a checkpoint written by ncf.py (no model or config)")
    config = ckpt["config"]
    if cache is not None and (config["nb_users"], config["nb_items"]) != (cache.num_users, cache.num_items):
        raise UserError(
            f"{what} {path} was trained on {config['nb_users']} users and {config['nb_items']} items, but "
            f"the dataset has {cache.num_users} users and {cache.num_items} items: "
            f"use the checkpoint with the dataset it was trained on"
        )
    return ckpt


def load_model_weights(model, ckpt, path):
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not fit the model ({str(err).splitlines()[0]}...): pass the "
                        f"--factors/--layers it was trained with") from None


def rng_states(ctx):
    """This rank's RNG states (dropout masks), gathered to every rank for last.pth."""
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if not ctx.distributed:
        return [state]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_states(states, ctx):
    if len(states) != ctx.world_size:
        warnings.warn(f"last.pth holds RNG states of {len(states)} processes, this run has {ctx.world_size}: "
                      f"dropout masks will differ from an uninterrupted run", stacklevel=2)
        return
    torch.set_rng_state(states[ctx.rank]["cpu"])
    if ctx.device.type == "cuda" and "cuda" in states[ctx.rank]:
        torch.cuda.set_rng_state(states[ctx.rank]["cuda"], ctx.device)


def reconcile_resumed_args(args, saved_args):
    """Warn about every flag that differs from the checkpoint's, saying which value wins."""
    for name in ARCHITECTURE_FLAGS:
        if getattr(args, name) != saved_args[name]:
            warnings.warn(f"--resume: --{name} is {getattr(args, name)} here but {saved_args[name]} in last.pth; "
                          f"the checkpoint's value wins (the model's shape cannot change)", stacklevel=2)
            setattr(args, name, saved_args[name])
    for name in TRAINING_FLAGS:
        if getattr(args, name) != saved_args.get(name):
            warnings.warn(f"--resume: --{name} is {getattr(args, name)} here but {saved_args.get(name)} in "
                          f"last.pth; this command line's value wins", stacklevel=2)


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


def test_mode(args, ctx, cache, log):
    path = args.load_checkpoint_path or os.path.join(args.checkpoint_dir, "model.pth")
    if not os.path.isfile(path):
        raise UserError(f"--mode test needs a checkpoint, and {path} does not exist: pass --load_checkpoint_path "
                        f"(or train first)")
    ckpt = load_checkpoint(path, cache)
    model = build_model(ckpt["config"], ctx.device)
    load_model_weights(model, ckpt, path)
    precision = choose_precision(args.opt_level, args.amp_dtype, ctx.device)
    log.info(f"device {ctx.device} | world size {ctx.world_size} | precision {precision.name} | checkpoint {path} "
             f"(epoch {ckpt.get('epoch')})")
    test_data = TestData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size)
    full_data = FullRankingData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size) if args.full_ranking else None
    log.log("test", **run_evaluation(model, test_data, full_data, args, precision, ctx))


def build_training(args, ctx, cache, last_path):
    """Model, optimizer, precision, scaler and progress state: fresh, or restored for --resume."""
    torch.manual_seed(args.seed)
    resumed = None
    if args.resume:
        if not os.path.isfile(last_path):
            raise UserError(f"--resume: {last_path} does not exist: run without --resume, or pass the "
                            f"--checkpoint_dir of the run to continue")
        resumed = load_checkpoint(last_path, cache, "--resume checkpoint")
        reconcile_resumed_args(args, resumed["args"])
    model = build_model(model_config(args, cache), ctx.device)
    if args.load_checkpoint_path and not resumed:
        load_model_weights(model, load_checkpoint(args.load_checkpoint_path, cache), args.load_checkpoint_path)
    precision = choose_precision(args.opt_level, args.amp_dtype, ctx.device)
    optimizer, optimizer_name = make_optimizer(model, args, ctx.device)
    scaler = precision.grad_scaler()
    state = {"epoch": 0, "best_hr": -1.0, "best_ndcg": 0.0, "best_epoch": 0, "time_to_target_s": None,
             "best_train_throughput": 0.0, "best_eval_throughput": 0.0, "elapsed_s": 0.0}
    if resumed:
        load_model_weights(model, resumed, last_path)
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        state.update(resumed["state"])
        restore_rng_states(resumed["rng"], ctx)
    else:
        # Same initial weights on every rank (DDP also broadcasts them), then per-rank dropout streams.
        torch.manual_seed(args.seed + ctx.rank)
    return model, optimizer, optimizer_name, precision, scaler, state


def train_mode(args, ctx, cache, log):
    last_path = os.path.join(args.checkpoint_dir, "last.pth")
    best_path = os.path.join(args.checkpoint_dir, "model.pth")
    if ctx.is_main:
        for path in (last_path, best_path):
            remove_stale_temporaries(path)
    model, optimizer, optimizer_name, precision, scaler, state = build_training(args, ctx, cache, last_path)
    resumed = state["epoch"] > 0
    train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model

    sampler = EpochSampler(cache.train, cache.num_items, args.negative_samples, ctx.device, args.seed)
    test_data = TestData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size)
    full_data = FullRankingData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size) if args.full_ranking else None
    divisor = ctx.world_size * args.grads_accumulated
    print_setup(log, ctx, precision, optimizer_name, cache, args, sampler.steps_per_epoch(args.batch_size, divisor))
    popularity_hr, popularity_ndcg = evaluate(ItemPopularity(sampler.items, cache.num_items), test_data, args,
                                              precision, ctx)
    log.info(f"item-popularity baseline: HR@{args.topk} {popularity_hr:.4f} | NDCG@{args.topk} {popularity_ndcg:.4f}")
    if resumed:
        log.info(f"resumed from {last_path} after epoch {state['epoch']}")
    log.write("config", args=vars(args), world_size=ctx.world_size, device=str(ctx.device), precision=precision.name,
              optimizer=optimizer_name, popularity_hr=popularity_hr, popularity_ndcg=popularity_ndcg)

    stop = StopRequest()
    progress = ctx.is_main and not args.no_progress and sys.stderr.isatty()
    run_start = time.perf_counter() - state["elapsed_s"]
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        start = time.perf_counter()
        loss, samples = train_epoch(train_model, optimizer, scaler, precision, sampler, epoch, args, ctx, progress)
        train_time = time.perf_counter() - start
        if not math.isfinite(loss):
            raise UserError(f"training diverged: the mean loss of epoch {epoch} is {loss}; lower --learning_rate "
                            f"(now {args.learning_rate}) or resume from an earlier last.pth")
        record = {"epoch": epoch, "loss": loss, "train_time_s": train_time, "train_throughput": samples / train_time}
        record.update(run_evaluation(model, test_data, full_data, args, precision, ctx))
        log.log("epoch", **record)

        state["epoch"] = epoch
        state["elapsed_s"] = time.perf_counter() - run_start
        state["best_train_throughput"] = max(state["best_train_throughput"], record["train_throughput"])
        state["best_eval_throughput"] = max(state["best_eval_throughput"], record["eval_throughput"])
        if record["hr"] > state["best_hr"]:
            state.update(best_hr=record["hr"], best_ndcg=record["ndcg"], best_epoch=epoch)
            if ctx.is_main:
                save_atomic(checkpoint_payload(model, args, cache, epoch, record), best_path)
        reached = record["hr"] >= args.threshold
        if reached and state["time_to_target_s"] is None:
            state["time_to_target_s"] = state["elapsed_s"]
        rngs = rng_states(ctx)
        if ctx.is_main:
            payload = checkpoint_payload(model, args, cache, epoch, record)
            payload.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), state=dict(state), rng=rngs)
            save_atomic(payload, last_path)
        if reached:
            log.info(f"HR@{args.topk} {record['hr']:.4f} reached --threshold {args.threshold}: stopping")
            break
        if stop.agreed(ctx):
            log.info(f"stopped by SIGTERM after epoch {epoch}; {last_path} is saved: continue with --resume")
            break

    log.log("summary", best_hr=state["best_hr"], best_ndcg=state["best_ndcg"], best_epoch=state["best_epoch"],
            time_to_target_s=state["time_to_target_s"], best_train_throughput=state["best_train_throughput"],
            best_eval_throughput=state["best_eval_throughput"])


def checkpoint_payload(model, args, cache, epoch, record):
    """Everything needed to rebuild and evaluate the model without the command line."""
    return {
        "model": model.state_dict(),
        "config": model.config,
        "epoch": epoch,
        "hr": record["hr"],
        "ndcg": record["ndcg"],
        "args": vars(args),
        "dataset": {"num_users": cache.num_users, "num_items": cache.num_items,
                    "source_sha256": cache.metadata.get("source_sha256")},
    }


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
