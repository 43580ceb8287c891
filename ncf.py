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
import cli  # noqa: I001  (first: sets the OpenMP wait policy before torch loads)

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

import allocator
import checkpoint
from checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
from cli import (EXIT_INTERRUPTED, LOCK_FILE, UserError, check_may_write, check_output_path, hold_lock, lock_note,
                 main_guard, remove_owned, remove_owned_folder, remove_stale_temporaries)
from dataloading import EpochSampler, FullRankingData, TestData, load_cache
from devices import Precision, choose_precision, matmul_precision, memory_bytes, pick_device, set_matmul_precision
from logger import RunLogger, format_record, is_run_log
from metrics import METRICS, ItemPopularity, candidate_loss_sum, full_ranks, rank_metric_sums, sampled_ranks
from model_config import DROPOUT, FACTORS, LAYERS, MODELS, ModelConfig, branch_widths
from neumf import build_model, load_pretrained

DATA_DIR = os.environ.get("DATA_DIR", "./data")
# --resume continues a run: the flags below take last.pth's values unless given on the command line.
# These cannot change: the model's shape, and the k that the run's best figures so far are HR@k of.
FIXED_ON_RESUME = ("model", "factors", "layers", "topk")
# These may: a value given on the command line is applied (to the restored optimizer and schedule too),
# printed with a warning, and recorded in the new last.pth.
RESUMED_FLAGS = (
    "epochs", "batch_size", "negative_samples", "learning_rate", "beta1", "beta2", "eps", "dropout",
    "grads_accumulated", "accumulate", "opt_level", "amp_dtype", "seed", "weight_decay", "lr_schedule",
    "warmup_epochs", "threshold", "patience", "valid_batch_size", "full_ranking", "save_every",
)
# What a last.pth written before a flag existed ran with, where that differs from the flag's default now.
BEFORE_THE_FLAG = {"model": "neumf", "accumulate": "split"}


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def given_flags(argv=None):
    """The names of the flags given on the command line, as opposed to left at their defaults."""
    parser = build_parser()
    for action in parser._actions:  # argparse's own way to leave unseen flags out of the namespace
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def build_parser():
    p = cli.ArgumentParser(
        description="Train a Neural Collaborative Filtering (NeuMF) model",
    )
    p.add_argument("--data", default=os.path.join(DATA_DIR, "cache", "ml-20m"),
                   help="folder of the dataset cache written by prepare_dataset.sh / convert.py")
    p.add_argument("-e", "--epochs", type=int, default=30, help="number of epochs to train")
    p.add_argument("-b", "--batch_size", type=int, default=1048576,
                   help="samples per batch over all processes; an optimizer step takes --grads_accumulated "
                        "batches (the recipe's meaning; see --accumulate)")
    p.add_argument("--valid_batch_size", type=int, default=1048576,
                   help="samples (user-item pairs) scored per evaluation batch")
    p.add_argument("-f", "--factors", type=int, default=FACTORS, help="GMF embedding size (predictive factors)")
    p.add_argument("--layers", nargs="+", type=int, default=list(LAYERS),
                   help="MLP layer sizes; the first is split between user and item embeddings")
    p.add_argument("-n", "--negative_samples", type=int, default=4, help="negatives per positive in training")
    p.add_argument("-l", "--learning_rate", type=float, default=0.0045, help="Adam learning rate")
    p.add_argument("-k", "--topk", type=int, default=10, help="rank cut-off k of HR@k and NDCG@k")
    p.add_argument("-t", "--threshold", type=float, default=1.0, help="stop training once HR@k reaches this")
    p.add_argument("--beta1", "-b1", type=float, default=0.25, help="Adam beta1")
    p.add_argument("--beta2", "-b2", type=float, default=0.5, help="Adam beta2")
    p.add_argument("--eps", type=float, default=1e-8, help="Adam epsilon")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="dropout after each MLP hidden layer")
    p.add_argument("--checkpoint_dir", default=os.path.join(DATA_DIR, "checkpoints"),
                   help="where model.pth (best epoch) and last.pth (for --resume) are written; '' saves nothing "
                        "(as NVIDIA's newest recipe)")
    p.add_argument("--load_checkpoint_path", "--checkpoint-path", dest="load_checkpoint_path", default=None,
                   help="model checkpoint to evaluate (--mode test) or to start training from")
    p.add_argument("--mode", choices=("train", "test"), default="train",
                   help="train, or only evaluate a checkpoint: --load_checkpoint_path, else CHECKPOINT_DIR/model.pth")
    p.add_argument("--grads_accumulated", type=int, default=1,
                   help="batches whose gradients one optimizer step accumulates (see --accumulate)")
    p.add_argument("--opt_level", choices=("O0", "O2"), default="O2",
                   help="O2: mixed precision (fp16 + loss scaling on CUDA, bf16 on CPU); O0: fp32")
    add_project_flags(p)
    return p


def add_project_flags(p):
    """The rest of the flags: the seed, this project's additions and the launcher's --local_rank."""
    p.add_argument("--amp", dest="opt_level", action="store_const", const="O2", default=argparse.SUPPRESS,
                   help="same as --opt_level O2")
    p.add_argument("--accumulate", choices=("recipe", "split"), default="recipe",
                   help="recipe: a step accumulates --grads_accumulated batches of -b samples (G x b per step, as "
                        "NVIDIA's); split: -b is the step's batch, split into G micro-batches (G trades memory only)")
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
    p.add_argument("--compile", action="store_true",
                   help="train and score through torch.compile (Inductor, eager's dropout draws): on one H200 with "
                        "AMP at 2^20, 1.4x training and 2.7x evaluation samples/s; the first epoch pays the compile "
                        "(about 10 s); fused kernels round differently and Adam amplifies it, so a run departs "
                        "from eager's within an epoch (the same statistics, not the same numbers). Slower on CPUs")
    p.add_argument("--model", choices=MODELS, default="neumf",
                   help="neumf, or one of its branches alone (gmf, mlp) to pretrain it (He et al. 2017, 3.4.1)")
    p.add_argument("--init_gmf", default=None, help="NeuMF starts from this GMF checkpoint (with --init_mlp)")
    p.add_argument("--init_mlp", default=None, help="NeuMF starts from this MLP checkpoint (with --init_gmf)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without a better selection HR@k (validation HR@k when the "
                        "cache has a validation split); 0: never")
    p.add_argument("--save_every", type=int, default=1,
                   help="write last.pth (for --resume) every this many epochs, and at the end of the run")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="decoupled weight decay (AdamW) over all parameters; 0: the recipe's Adam")
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after the warm-up: constant, or cosine decay to 0 at the last epoch")
    p.add_argument("--warmup_epochs", type=float, default=0.0,
                   help="linear learning-rate warm-up from 0 over this many epochs")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by torch.distributed.launch; the LOCAL_RANK environment variable wins")


def validate_args(args, world_size=1):
    """Checks that need nothing but the flags (and the launch's world size); each message names the flag
    and the fix."""
    positive = {
        "--epochs": args.epochs, "--batch_size": args.batch_size, "--valid_batch_size": args.valid_batch_size,
        "--factors": args.factors, "--negative_samples": args.negative_samples, "--topk": args.topk,
        "--grads_accumulated": args.grads_accumulated, "--learning_rate": args.learning_rate, "--eps": args.eps,
        "--save_every": args.save_every,
    }
    for flag, value in positive.items():
        if not value > 0 or value in (math.inf, -math.inf):  # NaN compares false both ways; huge ints are finite
            raise UserError(f"{flag} must be positive, got {value}")
    try:  # the model's own checks (ModelConfig), with one user and item standing in for the dataset's
        model_config(args, nb_users=1, nb_items=1)
    except ValueError as err:
        flag = next((flag for field, flag in MODEL_FLAGS.items() if field in str(err)), "--layers")
        raise UserError(f"{flag} {getattr(args, flag[2:])}: {err}") from None
    for flag, value in (("--beta1", args.beta1), ("--beta2", args.beta2)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if math.isnan(args.threshold):
        raise UserError("--threshold must be a number (HR@k to stop at; 1.0 never stops early), got nan")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    for flag, value in (("--weight_decay", args.weight_decay), ("--warmup_epochs", args.warmup_epochs),
                        ("--patience", args.patience)):
        if not value >= 0 or value in (math.inf, -math.inf):
            raise UserError(f"{flag} must be 0 or more, got {value}")
    if (args.init_gmf is None) != (args.init_mlp is None) or (args.init_gmf and args.model != "neumf"):
        raise UserError("--init_gmf and --init_mlp go together, with --model neumf: pass a GMF and an MLP "
                        "checkpoint (train them with --model gmf and --model mlp)")
    starts = [flag for flag, given in (("--resume", args.resume), ("--load_checkpoint_path", args.load_checkpoint_path),
                                       ("--init_gmf", args.init_gmf)) if given]
    if args.mode == "test" and (args.resume or args.init_gmf):
        raise UserError(f"--mode test evaluates a checkpoint (--load_checkpoint_path, else CHECKPOINT_DIR/model.pth) "
                        f"and takes no {'--resume' if args.resume else '--init_gmf/--init_mlp'}: leave it out")
    if args.mode == "train" and len(starts) > 1:
        raise UserError(f"{' and '.join(starts)}: a run starts from one of them (last.pth, a model checkpoint, or "
                        f"pretrained branches), not several: pass only one")
    parts = world_size * args.grads_accumulated  # a step's batch is split across ranks, then micro-batches
    if step_batch(args) % parts:
        if args.accumulate == "recipe":
            raise UserError(f"--batch_size {args.batch_size} is not divisible by world size {world_size} (every rank "
                            f"takes an equal share of each batch): choose a multiple of {world_size}")
        by = f"world size {world_size} x " if world_size > 1 else ""
        raise UserError(f"--batch_size {args.batch_size} is not divisible by {by}--grads_accumulated "
                        f"{args.grads_accumulated} (--accumulate split): choose a multiple of {parts}")


def step_batch(args):
    """The samples of one optimizer step over all ranks. The recipe's meaning (--accumulate recipe): a step
    accumulates --grads_accumulated batches of -b each. --accumulate split: -b is the step's batch, cut into
    G micro-batches, so that G changes memory and not the optimisation."""
    return args.batch_size * args.grads_accumulated if args.accumulate == "recipe" else args.batch_size


def hold_run_locks(args):
    """Rank 0's locks on the checkpoint folder (train mode) and the log, and the paths that taking them
    created, so that a run that fails before writing anything leaves nothing behind."""
    locks, created = [], []
    try:
        if args.mode == "train" and args.checkpoint_dir:
            if not os.path.exists(args.checkpoint_dir):
                created.append(args.checkpoint_dir)
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            locks.append(hold_lock(os.path.join(args.checkpoint_dir, LOCK_FILE),
                                   f"--checkpoint_dir {args.checkpoint_dir}"))
        if args.log_path:
            created += missing_folders(args.log_path)
            os.makedirs(os.path.dirname(os.path.abspath(args.log_path)), exist_ok=True)
            if not os.path.exists(args.log_path):
                created.append(args.log_path)
            locks.append(hold_lock(args.log_path, f"--log_path {args.log_path}", is_run_log, holder_note=False))
    except BaseException:  # the log's lock refused: let go of the folder's, and remove what was made for it
        for lock in locks:
            lock.close()
        remove_if_unused(created)
        raise
    return locks, created


def missing_folders(path):
    """The folders above `path` that do not exist yet, outermost first."""
    missing, folder = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    return missing


def remove_if_unused(created):
    """Remove the folders and files that hold_run_locks created and nothing has written to since,
    innermost first."""
    for path in reversed(created):
        if os.path.isdir(path):
            remove_owned_folder(path, {LOCK_FILE}, lock_note)
        elif os.path.isfile(path) and os.path.getsize(path) == 0:
            remove_owned(path, is_run_log)


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


def launch_environment(local_rank_flag):
    """(rank, local rank, world size) from the launcher's environment variables.

    Outside a launch (no WORLD_SIZE above 1) leftover RANK or LOCAL_RANK variables are ignored: they
    would otherwise silence rank 0's output or pick another GPU.
    """
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return 0, local_rank_flag or 0, 1
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", local_rank_flag or 0))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers set by the launcher: start with torchrun, "
                        "or unset them for one process") from None
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise UserError(f"WORLD_SIZE={world_size} is set but MASTER_ADDR and MASTER_PORT are not: start the job "
                        f"with torchrun (which sets them), or unset WORLD_SIZE for one process")
    return rank, local_rank, world_size


def setup_distributed(device_flag, local_rank_flag):
    """One set-up for one process and for torchrun: reads the launcher's environment."""
    rank, local_rank, world_size = launch_environment(local_rank_flag)
    device = pick_device(device_flag, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    set_matmul_precision(device)
    if world_size > 1:
        # A finite timeout turns a dead or stuck peer into an error instead of a hang.
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=10),
            device_id=device if device.type == "cuda" else None,
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def make_optimizer(model, learning_rate, betas, eps, weight_decay=0.0):
    """Adam with the fused kernel where this torch has it for the device, else the foreach one.

    With weight_decay, AdamW: decay decoupled from the gradient, over whole tables every step. L2 in the
    loss over each batch's rows would weigh a row by how often it is sampled and need a per-batch
    gather; decoupled decay keeps the fused kernel and the step free of host syncs (README).
    """
    kind = torch.optim.AdamW if weight_decay else torch.optim.Adam
    kwargs = dict(lr=learning_rate, betas=betas, eps=eps, **({"weight_decay": weight_decay} if weight_decay else {}))
    try:
        return kind(model.parameters(), fused=True, **kwargs), f"torch.optim.{kind.__name__}(fused=True)"
    except RuntimeError:
        return kind(model.parameters(), foreach=True, **kwargs), f"torch.optim.{kind.__name__}(foreach=True)"


def make_schedule(optimizer, schedule, warmup_epochs, epochs, steps_per_epoch):
    """Per-step learning-rate factor: linear warm-up over warmup_epochs, then constant or cosine to 0."""
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1.0, total - warmup))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


MODEL_FLAGS = {"mlp_layer_sizes": "--layers", "dropout": "--dropout", "mf_dim": "--factors"}  # ModelConfig field: flag


def model_config(args, cache=None, nb_users=None, nb_items=None):
    """The ModelConfig these flags ask for on `cache`'s users and items; a branch alone ignores the other
    branch's flag. ValueError (naming the field) for a shape no model has."""
    return ModelConfig(cache.num_users if cache else nb_users, cache.num_items if cache else nb_items, args.factors,
                       tuple(args.layers), args.dropout, args.model)


def check_memory(args, cache, device):
    """Refuse, before anything is allocated, a model or epoch that cannot fit in the device's memory at all:
    fp32 weights, gradients and Adam's two moments (4 copies of every parameter), and the epoch's int64
    permutation of positives x (1 + --negative_samples). A lower bound: passing it does not promise a fit."""
    try:
        shapes = checkpoint.parameter_shapes(model_config(args, cache))
    except (RuntimeError, ValueError, OverflowError, TypeError) as err:  # sizes beyond int64: torch cannot hold them
        raise UserError(f"--factors {args.factors} and --layers {args.layers} describe no model torch can build "
                        f"({str(err).splitlines()[0][:80]}): choose smaller values") from None
    parameters = sum(math.prod(shape) for shape in shapes.values())
    need = {"the model (--factors, --layers)": 16 * parameters,
            "an epoch's samples (--negative_samples)": 8 * cache.train.shape[0] * (1 + args.negative_samples)}
    total = memory_bytes(device, free=False)
    for what, size in need.items():
        if size > total:
            raise UserError(f"{what} would need at least {size / 2**30:,.0f} GiB, more than the {total / 2**30:,.0f} "
                            f"GiB of {device}: choose smaller values")


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
                progress=False, scheduler=None):
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
        cli.raise_if_interrupted()  # a Ctrl-C that a finaliser swallowed
        loss_sum += train_step(model, optimizer, scaler, precision, micro_batches, global_size, ctx)
        if scheduler is not None:
            scheduler.step()
        steps += 1
        samples += global_size
    if ctx.distributed:
        dist.all_reduce(loss_sum)
    return loss_sum.item() / (ctx.world_size * steps), samples


def candidate_scorer(model, compiled=False):
    """score(users [n], candidates [n, C]) -> logits [n, C]: NeuMF's factored score_candidates (the user's
    work shared by its candidates), else the model's forward per pair; through torch.compile if `compiled`
    (--compile: its cache keeps the code compiled for a model from one evaluation to the next)."""
    score = getattr(model, "score_candidates", None) or (
        lambda users, candidates: model(users[:, None].expand_as(candidates).reshape(-1),
                                        candidates.reshape(-1)).view(candidates.shape))
    return compile_for_run(score) if compiled else score


# The environment variables with which torch.compile compiles nothing (torch._dynamo's config and eval_frame).
COMPILE_SWITCHES = ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE")


def compile_switched_off():
    """The variable that switches torch.compile off in this environment (NAME=1), or None."""
    return next((name for name in COMPILE_SWITCHES if os.environ.get(name) == "1"), None)


def prepare_compile(device, main):
    """Before a --compile run: drop the code compiled for earlier runs in this process (tune.py's trials: torch
    keeps 8 versions of a function, then runs it eagerly without a word), and say where --compile cannot pay
    (on the main rank): switched off by the environment, or on a CPU."""
    import torch._dynamo

    torch._dynamo.reset()
    if not main:
        return
    if switch := compile_switched_off():
        warnings.warn(f"--compile: {switch}=1 is set, so torch.compile compiles nothing and this run is eager (its "
                      f"log records --compile as given); unset it to compile", stacklevel=3)
    elif device.type == "cpu":
        warnings.warn("--compile on a CPU: measured slower than eager at ml-20m's shapes (the CPU kernels of "
                      "cpu_kernels.py run eagerly inside the compiled code), and the compile adds seconds to the first "
                      "epoch (to the evaluation in --mode test); it runs compiled as asked", stacklevel=3)


def compile_for_run(fn):
    """torch.compile(fn) as --compile runs it: Inductor draws dropout masks through eager's RNG calls
    (fallback_random), so that a seed gives the masks of an eager run."""
    import torch._inductor.config  # loads torch._dynamo: only when compiling (its import doubles start-up)

    torch._inductor.config.fallback_random = True
    # torch's notes on code it handles correctly: the mask table's lru_cache (a pure function of its arguments)
    # and the complex128 rows the bf16 masks are copied as (eager under compile: cpu_kernels._MaskDrawer).
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    return torch.compile(fn)


@torch.no_grad()
def evaluate(model, test_data, topk, batch_size, precision, ctx, loss=True, compiled=False):
    """The sampled ranking metrics @k (metrics.METRICS) over all test users (each rank scores its share);
    returns {name: mean}, and with `loss` (a model that scores logits) "eval_loss": the recipe's validation
    loss, the mean binary cross-entropy over every candidate.

    `batch_size` bounds the user-candidate pairs scored at once (--valid_batch_size). Sums stay on the
    device and users are counted on the host: no host round trip per batch.
    """
    model.eval()
    sums = metric_sums(ctx.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    users_per_batch = max(1, batch_size // test_data.num_candidates)
    score = candidate_scorer(model, compiled)
    for start in range(0, test_data.users.shape[0], users_per_batch):
        candidates = test_data.candidates[start : start + users_per_batch]
        users = test_data.users[start : start + users_per_batch]
        with precision.autocast():
            scores = score(users, candidates)
        counted = None if test_data.counted is None else test_data.counted[start : start + users_per_batch]
        add_sums(sums, rank_metric_sums(sampled_ranks(scores, counted), topk))
        if loss:
            loss_sum += candidate_loss_sum(scores)
    sums[-2] = loss_sum  # with the metrics: one all-reduce
    means, loss_per_user = _all_reduce_means(sums, test_data.users.shape[0], ctx)
    return {**means, "eval_loss": loss_per_user / test_data.num_candidates} if loss else means


@torch.no_grad()
def evaluate_full_ranking(model, data, topk, batch_size, precision, ctx, compiled=False):
    """The ranking metrics @k against every item the user has not trained on, in user chunks of at most
    `batch_size` user-item pairs, scored like the sampled evaluation (factored per user); {name: mean}."""
    model.eval()
    sums = metric_sums(ctx.device)
    items = torch.arange(data.num_items, device=ctx.device, dtype=torch.int32)
    users_per_chunk = max(1, batch_size // data.num_items)
    score = candidate_scorer(model, compiled)
    for lo in range(0, data.users.shape[0], users_per_chunk):
        users = data.users[lo : lo + users_per_chunk]
        with precision.autocast():
            scores = score(users, items.expand(users.shape[0], -1))
        rows, excluded = data.train_pairs_of(lo, lo + users.shape[0])
        ranks = full_ranks(scores, data.positives[lo : lo + users.shape[0]], rows, excluded)
        add_sums(sums, rank_metric_sums(ranks, topk))
    return _all_reduce_means(sums, data.users.shape[0], ctx)[0]


def metric_sums(device):
    """One float64 device tensor: every metric's sum in METRICS order, a loss sum, then the users counted."""
    return torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=device)


def add_sums(sums, named):
    sums[:len(METRICS)] += torch.stack([named[name] for name in METRICS])


def _all_reduce_means(sums, count, ctx):
    """metric_sums' sums and this rank's user count, over all ranks -> ({name: sum / count}, the loss sum /
    count): reduce the sums and counts, divide once. The count joins as a host number (a kernel argument,
    not a copy): one read of the device per evaluation, at the end."""
    sums[-1] += count
    if ctx.distributed:
        dist.all_reduce(sums)
    *means, loss_per_user = (sums[:-1] / sums[-1]).tolist()
    return dict(zip(METRICS, means, strict=True)), loss_per_user


def run_evaluation(model, test_data, full_data, topk, batch_size, precision, ctx, valid_data=None, compiled=False):
    """Timed evaluation; returns a record of the figures (full-ranking and validation ones when asked for)."""
    record = {}
    if valid_data is not None:
        record.update(prefixed("valid_", evaluate(model, valid_data, topk, batch_size, precision, ctx,
                                                  compiled=compiled)))
    start = time.perf_counter()
    record.update(evaluate(model, test_data, topk, batch_size, precision, ctx, compiled=compiled))
    seconds = time.perf_counter() - start
    # Ranks score their shares at the same time, so the global count over one rank's time.
    record.update(eval_time_s=seconds, eval_throughput=test_data.total_samples / seconds)
    if full_data is not None:
        record.update(prefixed("full_", evaluate_full_ranking(model, full_data, topk, batch_size, precision, ctx,
                                                              compiled)))
    return record


def prefixed(prefix, figures):
    return {prefix + name: value for name, value in figures.items()}


def resolved_resume_args(args, saved_args, given):
    """The flags of a resumed run, as a new namespace: last.pth's values for the flags not given on the
    command line (a resume continues that run); a given flag of RESUMED_FLAGS that differs is applied,
    with a warning; one of FIXED_ON_RESUME that differs is refused."""
    resolved = vars(args).copy()
    for name in FIXED_ON_RESUME:
        saved = saved_args.get(name, BEFORE_THE_FLAG.get(name))
        if saved is None:
            continue
        if name in given and getattr(args, name) != saved:
            why = "the run's best figures so far are HR@k of that k" if name == "topk" else "the model's shape"
            raise UserError(f"--resume: --{name} is {getattr(args, name)} here but {saved} in last.pth, and it "
                            f"cannot change ({why}): leave --{name} out to continue that run, or start a new run in "
                            f"another --checkpoint_dir")
        resolved[name] = saved
    for name in RESUMED_FLAGS:
        saved = saved_args.get(name, BEFORE_THE_FLAG.get(name))
        if saved is None:
            continue
        if name not in given:
            resolved[name] = saved
        elif getattr(args, name) != saved and name != "epochs":  # more epochs: the usual resume
            warnings.warn(f"--resume: --{name} is {getattr(args, name)} here but {saved} in last.pth; "
                          f"this command line's value is applied from here on", stacklevel=2)
    return argparse.Namespace(**resolved)


def apply_optimizer_flags(optimizer, scheduler, args):
    """Put the run's optimizer and schedule flags into an optimizer and schedule restored from last.pth,
    whose state_dicts carry the previous run's: what a resumed run prints, does and records must agree."""
    for group in optimizer.param_groups:
        group.update(betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay,
                     initial_lr=args.learning_rate)
        if "decoupled_weight_decay" in group:  # an Adam state loaded into AdamW, or the reverse
            group["decoupled_weight_decay"] = bool(args.weight_decay)
    scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)  # the step about to be taken
    for group in optimizer.param_groups:
        group["lr"] = args.learning_rate * factor


# ---------------------------------------------------------------------------------------------
# Main


class StopRequest:
    """Records SIGTERM (what schedulers send before preempting) while training, which then stops after
    the epoch. The previous handler comes back when the training ends: a process that trains several
    times (tune.py) must not keep a handler that swallows a later SIGTERM."""

    def __init__(self):
        self.requested = False
        self.stopped = False  # set once the ranks agreed to stop

    def __enter__(self):
        self.previous = signal.getsignal(signal.SIGTERM)
        if self.previous is not signal.SIG_IGN:  # a SIGTERM the parent ignores (`trap '' TERM`) stays ignored
            signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, ctx):
        """True on every rank if any rank was asked to stop (one tiny all-reduce per epoch)."""
        flag = torch.tensor([float(self.requested)], device=ctx.device)
        if ctx.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped = bool(flag.item())
        return self.stopped


def print_setup(log, ctx, precision, optimizer_name, cache, args, steps, parameters):
    per_rank = step_batch(args) // ctx.world_size
    log.info(
        f"device {ctx.device} | world size {ctx.world_size} | precision {precision.name} ({args.opt_level}) | "
        f"fp32 matmuls {matmul_precision(ctx.device)} | optimizer {optimizer_name} | malloc {allocator.in_use()}\n"
        f"dataset {args.data}: {cache.num_users:,} users, {cache.num_items:,} items, "
        f"{cache.train.shape[0]:,} train positives, {cache.test.shape[0]:,} test users x "
        f"{1 + cache.test_negatives.shape[1]} candidates\n"
        f"global batch {step_batch(args):,} | per rank {per_rank:,} | micro-batch "
        f"{per_rank // args.grads_accumulated:,} | steps per epoch {steps:,}\n"
        f"model {args.model}: {parameters:,} parameters"
    )


def evaluation_data(cache, full_ranking, ctx, validation=False):
    """This rank's sampled-evaluation data, its full-ranking data when asked for (else None), and with
    `validation` its validation data (else None)."""
    test_data = TestData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size)
    full_data = FullRankingData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size) if full_ranking else None
    valid_data = TestData.from_cache(cache, ctx.device, ctx.rank, ctx.world_size, "valid") if validation else None
    return test_data, full_data, valid_data


def checkpoint_precision(args, given, saved_args, device):
    """--mode test evaluates in the precision the checkpoint was trained in, so that it reproduces the
    checkpoint's figures, unless --opt_level, --amp or --amp_dtype is given on this command line."""
    opt_level, amp_dtype = args.opt_level, args.amp_dtype
    if isinstance(saved_args, dict):
        if "opt_level" not in given and saved_args.get("opt_level") in ("O0", "O2"):
            opt_level = saved_args["opt_level"]
        if "amp_dtype" not in given and saved_args.get("amp_dtype") in ("auto", "float16", "bfloat16"):
            amp_dtype = saved_args["amp_dtype"]
    return choose_precision(opt_level, amp_dtype, device)


def evaluate_checkpoint(args, given, ctx, cache, log):
    if not (args.load_checkpoint_path or args.checkpoint_dir):
        raise UserError("--mode test with --checkpoint_dir '' needs --load_checkpoint_path: pass the checkpoint "
                        "to evaluate")
    path = args.load_checkpoint_path or os.path.join(args.checkpoint_dir, BEST_CHECKPOINT)
    if not os.path.isfile(path):
        raise UserError(f"--mode test needs a checkpoint, and {path} does not exist: pass --load_checkpoint_path "
                        f"(or train first)")
    model, ckpt = checkpoint.load_model(path, cache, ctx.device)
    precision = checkpoint_precision(args, given, ckpt.get("args"), ctx.device)
    log.info(f"device {ctx.device} | world size {ctx.world_size} | precision {precision.name} | checkpoint {path} "
             f"({'epoch ' + str(ckpt['epoch']) if ckpt.get('epoch') is not None else 'no epoch recorded'})")
    test_data, full_data, _ = evaluation_data(cache, args.full_ranking, ctx)
    log.log("test", **run_evaluation(model, test_data, full_data, args.topk, args.valid_batch_size, precision, ctx,
                                     compiled=args.compile))


@dataclass
class Training:
    """What a training run works with: built fresh, or restored from last.pth for --resume."""

    args: argparse.Namespace  # the run's flags (for --resume, reconciled with last.pth's)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    precision: Precision
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict  # progress: epoch done, best figures, throughputs, elapsed time


def initial_weights(model, args, cache):
    """Start from --load_checkpoint_path's weights, or NeuMF from a GMF and an MLP (--init_gmf/--init_mlp)."""
    if args.load_checkpoint_path:
        start = checkpoint.load_checkpoint(args.load_checkpoint_path, cache)
        checkpoint.load_model_weights(model, start, args.load_checkpoint_path)
    if args.init_gmf:
        branches = []
        for flag, path, kind in (("--init_gmf", args.init_gmf, "gmf"), ("--init_mlp", args.init_mlp, "mlp")):
            branch, _ = checkpoint.load_model(path, cache, torch.device("cpu"), flag)
            factors, layers = branch_widths(model.mf_dim, model.mlp_layer_sizes, kind)
            if (branch.model, branch.mf_dim, branch.mlp_layer_sizes) != (kind, factors, layers):
                raise UserError(f"{flag} {path} is a {branch.model} with factors {branch.mf_dim} and layers "
                                f"{list(branch.mlp_layer_sizes)}, but this NeuMF needs a {kind} with factors "
                                f"{factors} and layers {list(layers)}: pass matching --factors/--layers, or "
                                f"checkpoints of that shape")
            branches.append(branch.to(next(model.parameters()).device))
        load_pretrained(model, *branches)


def restore_scaler(scaler, state):
    """A last.pth written without loss scaling (CPU, O0, bf16) holds an empty scaler state, which an
    enabled GradScaler cannot load: start a fresh scale then."""
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        warnings.warn("--resume: last.pth was written without loss scaling (fp32 or bf16); fp16 starts with a "
                      "fresh loss scale", stacklevel=2)


def load_resume_state(args, given, cache, world_size):
    """(last.pth's content, the run's flags reconciled with it) for --resume, else (None, args)."""
    if not args.resume:
        return None, args
    if not args.checkpoint_dir:
        raise UserError("--resume continues from CHECKPOINT_DIR/last.pth, and --checkpoint_dir is '': pass the "
                        "--checkpoint_dir of the run to continue")
    last_path = os.path.join(args.checkpoint_dir, LAST_CHECKPOINT)
    if not os.path.isfile(last_path):
        raise UserError(f"--resume: {last_path} does not exist: run without --resume, or pass the "
                        f"--checkpoint_dir of the run to continue")
    resumed = checkpoint.load_checkpoint(last_path, cache, "--resume checkpoint", resume=True)
    broken = f"--resume: {last_path} holds flags or progress no run can have (edited?)"
    if not isinstance(resumed["args"], dict) or not isinstance(resumed["state"], dict) or \
            type(resumed["state"].get("epoch")) is not int or resumed["state"]["epoch"] < 0:
        raise UserError(f"{broken}: resume from a last.pth that ncf.py wrote, or train without --resume")
    resolved = resolved_resume_args(args, resumed["args"], given)
    if resolved.epochs <= resumed["state"]["epoch"]:
        raise UserError(f"--resume: {last_path} is at epoch {resumed['state']['epoch']}, and --epochs "
                        f"{resolved.epochs} leaves nothing to train: pass -e N with N > {resumed['state']['epoch']}")
    try:
        validate_args(resolved, world_size)
    except (UserError, TypeError, ValueError) as err:
        raise UserError(f"{broken} ({str(err)[:120]}): resume from a last.pth that ncf.py wrote, or pass the flag "
                        f"on the command line") from None
    return resumed, resolved


def build_training(args, ctx, cache, resumed, steps_per_epoch):
    """The model, optimizer, precision, scaler, schedule and progress: fresh, or restored from last.pth's
    content `resumed` (args already reconciled with it)."""
    torch.manual_seed(args.seed)
    model = build_model(model_config(args, cache), ctx.device)
    if not resumed:
        initial_weights(model, args, cache)
    precision = choose_precision(args.opt_level, args.amp_dtype, ctx.device)
    optimizer, optimizer_name = make_optimizer(model, args.learning_rate, (args.beta1, args.beta2), args.eps,
                                               args.weight_decay)
    scheduler = make_schedule(optimizer, args.lr_schedule, args.warmup_epochs, args.epochs, steps_per_epoch)
    scaler = precision.grad_scaler()
    state = {"epoch": 0, "best_hr": -1.0, "best_ndcg": 0.0, "best_epoch": 0, "time_to_target_s": None,
             "best_train_throughput": 0.0, "best_eval_throughput": 0.0, "elapsed_s": 0.0}
    if resumed:
        checkpoint.load_model_weights(model, resumed, os.path.join(args.checkpoint_dir, LAST_CHECKPOINT))
        checkpoint.check_optimizer_state(resumed["optimizer"], model, os.path.join(args.checkpoint_dir,
                                                                                    LAST_CHECKPOINT))
        optimizer.load_state_dict(resumed["optimizer"])
        restore_scaler(scaler, resumed["scaler"])
        if resumed.get("scheduler"):
            scheduler.load_state_dict(resumed["scheduler"])
        # The schedule's position in this run's steps: a resume starts an epoch, and with another batch
        # (-b, -n, --grads_accumulated) last.pth's step count would put the warm-up or decay elsewhere.
        scheduler.last_epoch = int(resumed["state"]["epoch"]) * steps_per_epoch
        apply_optimizer_flags(optimizer, scheduler, args)
        state.update(resumed["state"])
        checkpoint.restore_rng_states(resumed["rng"], ctx)
    else:
        # Same initial weights on every rank (DDP also broadcasts them), then per-rank dropout streams.
        torch.manual_seed(args.seed + ctx.rank)
    return Training(args, model, optimizer, optimizer_name, precision, scaler, scheduler, state)


def selection_metric(record):
    """The figure that picks the best epoch, --threshold and --patience: the validation HR@k when the cache
    has a validation split (never select on test figures), else the test HR@k, as the recipe does."""
    return record.get("valid_hr", record["hr"])


def update_progress(state, record, epoch, elapsed_s, threshold):
    """Fold an epoch's record into the run's progress; returns (new best epoch?, threshold reached?)."""
    state["epoch"] = epoch
    state["elapsed_s"] = elapsed_s
    state["best_train_throughput"] = max(state["best_train_throughput"], record["train_throughput"])
    state["best_eval_throughput"] = max(state["best_eval_throughput"], record["eval_throughput"])
    # Sums for the recipe's mean throughputs (a last.pth written before them starts them here).
    state["train_throughput_sum"] = state.get("train_throughput_sum", 0.0) + record["train_throughput"]
    state["eval_throughput_sum"] = state.get("eval_throughput_sum", 0.0) + record["eval_throughput"]
    state["timed_epochs"] = state.get("timed_epochs", 0) + 1
    selection = selection_metric(record)
    improved = selection > state.get("best_selection", state["best_hr"])
    if improved:
        state.update(best_selection=selection, best_hr=record["hr"], best_ndcg=record["ndcg"], best_epoch=epoch,
                     time_to_best_model_s=elapsed_s)
    reached = selection >= threshold
    if reached and state["time_to_target_s"] is None:
        state["time_to_target_s"] = elapsed_s
    return improved, reached


def save_checkpoints(training, cache, ctx, epoch, record, improved, write_last, folder):
    """model.pth when the epoch is the best so far, and last.pth (for --resume) when `write_last`; rank 0
    writes, the other ranks go on (only the RNG states are gathered from them)."""
    rngs = checkpoint.rng_states(ctx) if write_last else None  # a collective: every rank takes part
    if not ctx.is_main:
        return
    best = checkpoint.payload(training.model, vars(training.args), checkpoint.dataset_identity(cache), epoch, record)
    if improved:
        checkpoint.save_atomic(best, os.path.join(folder, BEST_CHECKPOINT))
    if not write_last:
        return
    last = {**best, "optimizer": training.optimizer.state_dict(), "scaler": training.scaler.state_dict(),
            "scheduler": training.scheduler.state_dict(), "state": dict(training.state), "rng": rngs}
    checkpoint.save_atomic(last, os.path.join(folder, LAST_CHECKPOINT))


def check_finite(loss, model, epoch, learning_rate):
    """Stop a diverged run before any figure is computed: a diverged model's NaN scores must never be
    reported, saved as the best epoch, or stop the run as if it had reached --threshold."""
    if not math.isfinite(loss) or not weights_are_finite(model):
        what = f"the mean loss of epoch {epoch} is {loss}" if not math.isfinite(loss) else \
            f"epoch {epoch} left non-finite weights"
        raise UserError(f"training diverged: {what}; lower --learning_rate (now {learning_rate}) or resume "
                        f"from an earlier last.pth")


def weights_are_finite(model):
    """One host read per epoch: every parameter free of NaN and inf."""
    return bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all())


def replace_previous_run(folder):
    """A fresh run in a folder with a previous run's checkpoints replaces them as it goes: say so. Its
    last.pth goes now: were this run stopped before writing its own, a --resume would otherwise continue the
    previous run beside this run's model.pth (both were checked to be ncf.py's when the run started)."""
    previous = [name for name in (BEST_CHECKPOINT, LAST_CHECKPOINT) if os.path.isfile(os.path.join(folder, name))]
    if previous:
        warnings.warn(f"--checkpoint_dir {folder} holds a previous run's {' and '.join(previous)}, which this run "
                      f"replaces: pass --resume to continue that run instead, or another --checkpoint_dir to keep "
                      f"them", stacklevel=2)
        remove_owned(os.path.join(folder, LAST_CHECKPOINT), checkpoint.is_checkpoint_file)


MIN_STEPS_PER_EPOCH = 20  # fewer: Adam takes too few steps per epoch to learn on a small dataset (README)


def warn_if_few_steps(steps, samples_per_epoch, args):
    """The recipe's batch (2^20) suits ml-20m's 100M samples per epoch; on a dataset of 100k ratings it is one
    optimizer step per epoch, and the model trails item popularity for many epochs. Say so, with a batch
    that gives MIN_STEPS_PER_EPOCH or more steps (a power of two, as the recipe's)."""
    if steps >= MIN_STEPS_PER_EPOCH:
        return
    suggested = 2 ** max(8, int(math.log2(max(1, samples_per_epoch // MIN_STEPS_PER_EPOCH))))
    per_step = step_batch(args) // args.batch_size  # -b that gives `suggested` samples per step
    warnings.warn(f"an epoch here is {steps} optimizer step(s) of {step_batch(args):,} samples "
                  f"({samples_per_epoch:,} in all): too few to learn well on a dataset this small; try "
                  f"-b {max(1, suggested // per_step):,} ({math.ceil(samples_per_epoch / suggested)} steps)",
                  stacklevel=2)


def log_start(log, training, ctx, cache, sampler, test_data):
    """The set-up figures, and the item-popularity baseline the model must beat."""
    args = training.args
    steps = sampler.steps_per_epoch(step_batch(args), ctx.world_size * args.grads_accumulated)
    print_setup(log, ctx, training.precision, training.optimizer_name, cache, args, steps,
                sum(p.numel() for p in training.model.parameters()))
    if ctx.is_main:
        warn_if_few_steps(steps, sampler.samples_per_epoch, args)
    popularity = evaluate(ItemPopularity(sampler.items, cache.num_items), test_data, args.topk, args.valid_batch_size,
                          training.precision, ctx, loss=False)  # counts, not logits
    log.info(f"item-popularity baseline: {format_record(popularity, args.topk)}")
    if training.state["epoch"] > 0:
        log.info(f"resumed from {os.path.join(args.checkpoint_dir, LAST_CHECKPOINT)} after epoch "
                 f"{training.state['epoch']}")
    log.write("config", args=vars(args), world_size=ctx.world_size, device=str(ctx.device),
              precision=training.precision.name, optimizer=training.optimizer_name, malloc=allocator.in_use(),
              **prefixed("popularity_", popularity))


def stop_reason(training, record, epoch, reached, stop, ctx):
    """Why training stops after this epoch (a line for the log), or None to go on."""
    args, state = training.args, training.state
    chosen_by = "validation HR" if "valid_hr" in record else "HR"
    if reached:
        return f"{chosen_by}@{args.topk} {selection_metric(record):.4f} reached --threshold {args.threshold}: stopping"
    if args.patience and epoch - state["best_epoch"] >= args.patience:
        return (f"{chosen_by}@{args.topk} has not improved for {args.patience} epochs (--patience; best "
                f"{state['best_selection']:.4f} at epoch {state['best_epoch']}): stopping")
    if not stop.agreed(ctx) or epoch == args.epochs:  # (agreed: a collective, every epoch on every rank)
        stop.stopped = False  # a SIGTERM during the last epoch stops nothing: the run is complete, status 0
        return None
    if not args.checkpoint_dir:
        return f"stopped by SIGTERM after epoch {epoch}; nothing saved (--checkpoint_dir '')"
    return (f"stopped by SIGTERM after epoch {epoch}; {os.path.join(args.checkpoint_dir, LAST_CHECKPOINT)} is "
            f"saved: continue with --resume")


def train_mode(args, given, ctx, cache, log, on_epoch=None):
    """Train; `given` names the flags of the command line (for --resume); `on_epoch(record)` is called with
    every epoch's figures (tune.py prunes trials with it). Returns the run's summary."""
    training, sampler, eval_data = set_up_training(args, given, ctx, cache, log)
    args, state, model = training.args, training.state, training.model
    train_model = DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None) \
        if ctx.distributed else model
    if args.compile:
        train_model = compile_for_run(train_model)
    with StopRequest() as stop:
        progress = ctx.is_main and not args.no_progress and sys.stderr.isatty()
        run_start = time.perf_counter() - state["elapsed_s"]
        for epoch in range(state["epoch"] + 1, args.epochs + 1):
            start = time.perf_counter()
            loss, samples = train_epoch(train_model, training.optimizer, training.scaler, training.precision, sampler,
                                        epoch, step_batch(args), args.grads_accumulated, ctx, progress,
                                        training.scheduler)
            train_time = time.perf_counter() - start
            check_finite(loss, model, epoch, args.learning_rate)
            record = {"epoch": epoch, "loss": loss, "train_time_s": train_time,
                      "train_throughput": samples / train_time,
                      **run_evaluation(model, *eval_data[:2], args.topk, args.valid_batch_size, training.precision, ctx,
                                       eval_data[2], args.compile)}
            log.log("epoch", **record)
            improved, reached = update_progress(state, record, epoch, time.perf_counter() - run_start, args.threshold)
            if on_epoch is not None:
                on_epoch(record)
            reason = stop_reason(training, record, epoch, reached, stop, ctx)
            # last.pth (~380 MB with Adam's moments at ml-20m size) every --save_every epochs, and whenever the
            # run ends, so that a short GPU epoch does not wait on the disk every time.
            write_last = bool(reason) or epoch == args.epochs or epoch % args.save_every == 0
            if args.checkpoint_dir:  # '' saves nothing
                save_checkpoints(training, cache, ctx, epoch, record, improved, write_last, args.checkpoint_dir)
            if reason:
                log.info(reason)
                break
    return log_summary(log, state, args.topk, cache.has_validation, stop.stopped)


def set_up_training(args, given, ctx, cache, log):
    """The run's Training (fresh, or restored for --resume), its epoch sampler and evaluation data; prints and
    logs the set-up."""
    if ctx.is_main and args.checkpoint_dir:
        for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
            remove_stale_temporaries(os.path.join(args.checkpoint_dir, name))
    resumed, args = load_resume_state(args, given, cache, ctx.world_size)
    sampler = EpochSampler(cache.train, cache.num_items, args.negative_samples, ctx.device, args.seed)
    steps = sampler.steps_per_epoch(step_batch(args), ctx.world_size * args.grads_accumulated)
    training = build_training(args, ctx, cache, resumed, steps)
    if ctx.is_main and not resumed and args.checkpoint_dir:
        replace_previous_run(args.checkpoint_dir)
    eval_data = evaluation_data(cache, args.full_ranking, ctx, cache.has_validation)
    log_start(log, training, ctx, cache, sampler, eval_data[0])
    return training, sampler, eval_data


def log_summary(log, state, topk, validation, interrupted):
    """The end-of-run figures (this project's and, through the logger, the recipe's keys), logged and returned."""
    timed = max(1, state.get("timed_epochs", 0))
    summary = {"best_hr": state["best_hr"], "best_ndcg": state["best_ndcg"], "best_epoch": state["best_epoch"],
               "selected_by": f"{'validation' if validation else 'test'} HR@{topk}",
               "time_to_target_s": state["time_to_target_s"], "time_to_best_model_s": state.get("time_to_best_model_s"),
               "run_time_s": state["elapsed_s"], "best_train_throughput": state["best_train_throughput"],
               "best_eval_throughput": state["best_eval_throughput"],
               "mean_train_throughput": state.get("train_throughput_sum", 0.0) / timed,
               "mean_eval_throughput": state.get("eval_throughput_sum", 0.0) / timed, "interrupted": interrupted}
    if validation:
        summary["best_valid_hr"] = state["best_selection"]
    log.log("summary", **summary)
    return summary


def check_outputs(args):
    """Before any work: the checkpoint folder and log can be written, and the files there that a run
    replaces or appends to are ours (cli.check_may_write: a checkpoint's own fields, a log's records)."""
    if args.mode == "train" and args.checkpoint_dir:
        data, folder = os.path.realpath(args.data), os.path.realpath(args.checkpoint_dir)
        if os.path.commonpath((data, folder)) == data:
            raise UserError(f"--checkpoint_dir {args.checkpoint_dir} is inside the --data cache {args.data}, which "
                            f"convert.py would then refuse to rebuild: choose a folder outside it")
        check_output_path(args.checkpoint_dir, "--checkpoint_dir", folder=True)
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            check_may_write(os.path.join(args.checkpoint_dir, name), "--checkpoint_dir", checkpoint.is_checkpoint_file,
                            "a checkpoint")
    if args.log_path:
        check_may_write(args.log_path, "--log_path", is_run_log, "a run log")


def run(argv=None, on_epoch=None):
    """What `python ncf.py ARGS` does, errors raised rather than reported (tune.py runs trials with it);
    returns the training summary (None in --mode test)."""
    args = parse_args(argv)
    validate_args(args, world_size=launch_environment(args.local_rank)[2])
    ctx = setup_distributed(args.device, args.local_rank)
    if args.compile:
        prepare_compile(ctx.device, ctx.is_main)
    log = result = None
    locks, created = [], []
    succeeded = False
    try:
        if ctx.is_main:
            check_outputs(args)
        cache = load_cache(args.data)
        candidates = cache.test_negatives.shape[1] + 1
        if args.topk >= candidates:  # every user's item would be in its top k: HR@k 1 whatever the model
            raise UserError(f"--topk {args.topk} is not smaller than the {candidates} candidates per test user, so "
                            f"every HR@k would be 1: choose --topk < {candidates}")
        if args.mode == "train":
            check_memory(args, cache, ctx.device)
        if ctx.is_main:
            locks, created = hold_run_locks(args)
        log = RunLogger(args.log_path, enabled=ctx.is_main, k=args.topk)
        if args.mode == "test":
            evaluate_checkpoint(args, given_flags(argv), ctx, cache, log)
            result = None
        else:
            result = train_mode(args, given_flags(argv), ctx, cache, log, on_epoch)
        created = []  # the run got through: what it made stays
        succeeded = True
        return result
    finally:
        if log is not None:
            log.close()
        for lock in locks:
            lock.close()
        remove_if_unused(created)
        if ctx.distributed and succeeded:
            if result is not None and result["interrupted"]:
                # Stopped by SIGTERM, every rank exits 130 (main); torchrun answers the first such exit by sending
                # SIGTERM to the others, which would end a rank still leaving as -15. What it must do is done
                # (rank 0 wrote last.pth before the barrier below): ignore it for the second this rank needs.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            # The ranks leave together, once rank 0 has written its files and closed the log (issue 21). A rank
            # that went straight on into interpreter shutdown could still have a gloo worker thread holding its
            # last collective's tensors: freeing them then needs the GIL, Python ends such a thread, and the C++
            # runtime aborts the process ("terminate called without an active exception", exit -6).
            # destroy_process_group does not stop those threads (DDP keeps the gloo backend alive). A peer
            # that dies breaks the barrier at once (its sockets close), a stuck one after the group's timeout.
            # A rank that failed does not wait here for the others: it ends with its error, and the launcher
            # ends them.
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(wait_all_ranks=True)  # on the calling thread; names a missing rank
            else:
                dist.barrier()
            dist.destroy_process_group()


@main_guard
def main(argv=None):
    summary = run(argv)
    if summary is not None and summary["interrupted"]:
        # Stopped by SIGTERM after saving last.pth: not a finished run, so a scheduler must not count it as
        # one (a preempted job is requeued), and the status says so as Ctrl-C's does, on every rank.
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
