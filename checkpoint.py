"""Checkpoints shared by ncf.py and inference.py: atomic save, safe load with checks, payloads, RNG states.

model.pth holds the unwrapped model of the best epoch and everything needed to rebuild it (its config,
the epoch, its figures, the run's flags and the dataset's identity); last.pth adds the optimizer, the loss
scaler, the run's progress and every rank's RNG state, for --resume.
"""
import os
import warnings

import torch
import torch.distributed as dist

from cli import UserError, atomic_file
from neumf import build_model


def safe_load(path, what, fix):
    """torch.load restricted to tensors and plain data (weights_only), with one-line user errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist: {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter would add stderr lines
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that runs code
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "it holds Python objects, not just tensors and plain data, and is not loaded for safety"
        else:
            reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise UserError(f"cannot load {what} {path} ({reason}): {fix}") from None




def save_atomic(obj, path):
    """torch.save through a temporary file renamed into place: a crash never leaves half a checkpoint."""
    with atomic_file(path) as f:
        torch.save(obj, f)


def payload(model, args, dataset, epoch, record):
    """model.pth's content: everything needed to rebuild and evaluate the model without the command line.

    `args` is the run's flags as a dict, `dataset` the identity of the data it was trained on.
    """
    return {"model": model.state_dict(), "config": model.config, "epoch": epoch, "hr": record["hr"],
            "ndcg": record["ndcg"], "args": dict(args), "dataset": dict(dataset)}


def dataset_identity(cache):
    return {"num_users": cache.num_users, "num_items": cache.num_items,
            "source_sha256": cache.metadata.get("source_sha256")}


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


def load_model(path, cache, device, what="checkpoint"):
    """The model of a checkpoint, rebuilt from its config on `device`, in eval mode, and the checkpoint."""
    ckpt = load_checkpoint(path, cache, what)
    model = build_model(ckpt["config"], device)
    load_model_weights(model, ckpt, path)
    return model.eval(), ckpt


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
