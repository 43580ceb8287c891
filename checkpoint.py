"""Checkpoints shared by ncf.py and inference.py: atomic save, safe load with checks, payloads, RNG states.

model.pth holds the unwrapped model of the best epoch and everything needed to rebuild it (its config,
the epoch, its figures, the run's flags and the dataset's identity); last.pth adds the optimizer, the loss
scaler, the run's progress and every rank's RNG state, for --resume.
"""
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist

import cache_format
from cli import EnvironmentFailure, UserError, atomic_file, identity_mismatch
from dataloading import safe_load
from devices import memory_bytes
from model_config import ModelConfig
from neumf import NeuMF, build_model

BEST_CHECKPOINT = "model.pth"  # a run's best epoch's model (the recipe's name)
LAST_CHECKPOINT = "last.pth"  # a run's last epoch's full state, for --resume


def is_checkpoint_file(path):
    """A proof (cli.may_write) that ncf.py wrote `path`: it loads as a checkpoint of ours (its own fields)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = torch.load(path, map_location="cpu", weights_only=True)
    return isinstance(content, dict) and isinstance(content.get("model"), dict) and \
        isinstance(content.get("config"), dict)


def save_atomic(obj, path):
    """torch.save through a temporary file renamed into place: a crash never leaves half a checkpoint."""
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise EnvironmentFailure(f"cannot write {path} ({reason}): free some space or choose another "
                                 f"--checkpoint_dir; the previous file, if any, is intact") from None


def payload(model, args, dataset, epoch, record):
    """model.pth's content: everything needed to rebuild and evaluate the model without the command line.

    `args` is the run's flags as a dict, `dataset` the identity of the data it was trained on.
    """
    return {"model": model.state_dict(), "config": model.config, "epoch": epoch, "hr": record["hr"],
            "ndcg": record["ndcg"], "args": dict(args), "dataset": dict(dataset)}


def dataset_identity(cache):
    """What identifies the data and split a model was trained on, and the held-out items it was evaluated
    on (cache_format.evaluation_identity; only --resume compares the latter)."""
    return cache_format.evaluation_identity(cache.metadata)


RESUME_KEYS = ("optimizer", "scaler", "state", "rng", "args")


def load_checkpoint(path, cache, what="checkpoint", resume=False):
    """Load a checkpoint (tensors and plain data only), check its content, and that it was trained on
    `cache`'s dataset when one is given. `resume`: it must also hold what --resume needs."""
    fix = "pass a checkpoint written by ncf.py (--load_checkpoint_path), or train first"
    ckpt = safe_load(path, what, fix)
    _check_size(ckpt, path, what, fix)
    if is_nvidia_state_dict(ckpt):
        ckpt = from_nvidia(ckpt, path, what)
    _check_content(ckpt, path, what, fix)
    if resume and not all(key in ckpt for key in RESUME_KEYS):
        raise UserError(f"{what} {path} lacks the optimizer and progress state of a last.pth (it is a model-only "
                        f"checkpoint?): resume from the last.pth that ncf.py wrote, or train without --resume")
    if cache is not None:
        _check_dataset(ckpt, cache, path, what, held_out=resume)
    return ckpt


# NVIDIA's recipe saves model.pth as the plain state dict of its NeuMF: GMF and MLP embeddings in four
# tables (one table per side here, [GMF | MLP] columns), and "module." before every name when saved from
# DDP. Its mlp.N and final layers are named and ordered as here ([GMF | MLP] into the output layer).
NVIDIA_TABLES = {"user_embed.weight": ("mf_user_embed.weight", "mlp_user_embed.weight"),
                 "item_embed.weight": ("mf_item_embed.weight", "mlp_item_embed.weight")}
NVIDIA_DROPOUT = 0.5  # not in its checkpoint: the recipe's default (it changes training, not scores)


def is_nvidia_state_dict(content):
    return isinstance(content, dict) and "model" not in content and any(
        isinstance(name, str) and name.removeprefix("module.") == "mf_user_embed.weight" for name in content)


def from_nvidia(state_dict, path, what):
    """A checkpoint of ours from NVIDIA's model.pth, its config worked out from the tensor shapes. It records
    no dataset, so only the user and item counts can be compared with a cache."""
    weights = {name.removeprefix("module."): tensor for name, tensor in state_dict.items()}
    if len(weights) < len(state_dict) or not all(isinstance(t, torch.Tensor) and t.is_floating_point()
                                                 for t in weights.values()):
        raise UserError(f"{what} {path} looks like an NVIDIA-recipe model.pth but holds a weight twice (with and "
                        f"without 'module.') or a weight that is not floating point: pass the model.pth that "
                        f"NVIDIA's ncf.py wrote, unedited")
    tables = [weights.get(name) for pair in NVIDIA_TABLES.values() for name in pair]
    layers = sorted(int(name.split(".")[1]) for name in weights if name.startswith("mlp.") and name.endswith(".weight")
                    and name.split(".")[1].isdigit())
    shapes_ok = all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in tables) and \
        tables[0].shape[0] == tables[1].shape[0] and tables[2].shape[0] == tables[3].shape[0] and \
        tables[0].shape[1] == tables[2].shape[1] and tables[1].shape[1] == tables[3].shape[1] and \
        layers == list(range(len(layers))) and all(isinstance(weights.get(f"mlp.{i}.weight"), torch.Tensor) and
                                                    weights[f"mlp.{i}.weight"].dim() == 2 for i in layers)
    if not shapes_ok:
        raise UserError(f"{what} {path} looks like an NVIDIA-recipe model.pth but its tables or layers do not fit "
                        f"together: pass the model.pth that NVIDIA's ncf.py wrote, unedited")
    model = {ours: torch.cat([weights.pop(name) for name in pair], dim=1) for ours, pair in NVIDIA_TABLES.items()}
    model.update(weights)
    config = {"nb_users": tables[0].shape[0], "nb_items": tables[2].shape[0], "mf_dim": tables[0].shape[1],
              "mlp_layer_sizes": [2 * tables[1].shape[1]] + [model[f"mlp.{i}.weight"].shape[0] for i in layers],
              "dropout": NVIDIA_DROPOUT}
    return {"model": model, "config": config, "format": "nvidia"}


def to_nvidia(ckpt):
    """NVIDIA's model.pth (a plain state dict of its NeuMF) from a NeuMF checkpoint of ours."""
    config = ckpt["config"]
    if config.get("model", "neumf") != "neumf":
        raise UserError(f"NVIDIA's recipe has NeuMF only, and this checkpoint holds its {config['model']} branch "
                        f"alone: export a NeuMF checkpoint")
    state = {name: tensor for name, tensor in ckpt["model"].items() if name not in NVIDIA_TABLES}
    for ours, (gmf, mlp) in NVIDIA_TABLES.items():
        state[gmf], state[mlp] = (t.clone() for t in ckpt["model"][ours].split(
            (config["mf_dim"], config["mlp_layer_sizes"][0] // 2), dim=1))
    return state


def _check_size(ckpt, path, what, fix):
    """Tensors that declare more elements than the machine could hold are refused before any check touches
    them: a few-KB file of expanded (stride-0) tensors would otherwise allocate until the process dies."""
    weights = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
    declared = sum(4 * t.numel() for t in weights.values() if isinstance(t, torch.Tensor)) \
        if isinstance(weights, dict) else 0
    if declared > memory_bytes(torch.device("cpu"), free=False):
        raise UserError(f"{what} {path} declares weights of {declared / 2**30:,.0f} GiB, more than this machine holds: "
                        f"{fix}")


def _check_content(ckpt, path, what, fix):
    """A dict with a model of finite tensors and a config of the right types: anything else is refused
    before it can be built, trusted or trained on."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"),
                                                                                                dict):
        raise UserError(f"{what} {path} is not a checkpoint written by ncf.py (no model or config): {fix}")
    config = ckpt["config"]
    try:
        if ModelConfig.from_dict(config).as_dict() != {**config, "mlp_layer_sizes": list(config["mlp_layer_sizes"])}:
            raise ValueError("a size of the branch it leaves out")  # a gmf with layers, say: not what ncf.py writes
    except (ValueError, KeyError) as err:
        raise UserError(f"{what} {path} has a broken config ({str(err)[:200]}): {fix}") from None
    tensors = ckpt["model"].values()
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise UserError(f"{what} {path} holds model weights that are not tensors: {fix}")
    _check_shapes(ckpt, path, what, fix)
    if not all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()):
        raise UserError(f"{what} {path} holds non-finite weights (NaN or inf): the run that wrote it diverged; "
                        f"use a checkpoint of an earlier epoch, or train again with a lower --learning_rate")


def _check_shapes(ckpt, path, what, fix):
    """The weights must be those of the model the config describes, checked before anything is built:
    an edited config (10^9 factors, say) would otherwise allocate until the process is killed."""
    try:
        expected = parameter_shapes(ckpt["config"])
    except (ValueError, RuntimeError) as err:
        raise UserError(f"{what} {path} has a config no model can be built from ({str(err)[:120]}): {fix}") from None
    actual = {name: tuple(tensor.shape) for name, tensor in ckpt["model"].items()}
    if actual != expected:
        wrong = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
        raise UserError(f"{what} {path} holds weights that do not fit its config ({wrong[0]}: "
                        f"{actual.get(wrong[0])} stored, {expected.get(wrong[0])} expected): {fix}")


def parameter_shapes(config):
    """{name: shape} of the model a config builds, worked out without allocating it (on the meta device)."""
    config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    with torch.device("meta"):
        model = NeuMF(**asdict(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _check_dataset(ckpt, cache, path, what, held_out=False):
    """Refuse a checkpoint of other training data or split. `held_out` (--resume): the held-out items and
    negatives too, since the run's best figures so far were measured on them."""
    config = ckpt["config"]
    if (config["nb_users"], config["nb_items"]) != (cache.num_users, cache.num_items):
        raise UserError(
            f"{what} {path} was trained on {config['nb_users']} users and {config['nb_items']} items, but "
            f"the dataset has {cache.num_users} users and {cache.num_items} items: "
            f"use the checkpoint with the dataset it was trained on"
        )
    if not isinstance(ckpt.get("dataset"), dict) and cache.has_validation:
        raise UserError(f"{what} {path} records no dataset (an NVIDIA-format or an old checkpoint), so nothing shows "
                        f"that it was not trained on {cache.path}'s validation items (the recipe holds none out), "
                        f"which would inflate its validation figures: use it with a cache without --validation")
    if not isinstance(ckpt.get("dataset"), dict):
        warnings.warn(f"{what} {path} records no dataset (an NVIDIA-format or an old checkpoint): only its user and "
                      f"item counts could be checked against {cache.path}, not its split", stacklevel=3)
    current = (cache_format.evaluation_identity if held_out else cache_format.dataset_identity)(cache.metadata)
    mismatch = identity_mismatch(ckpt.get("dataset"), current)
    if mismatch is None:
        return
    key, there, here = mismatch
    if key == "held_out_sha256":
        raise UserError(f"{what} {path} was evaluated on other held-out items or negatives of this data (a cache "
                        f"converted with another --valid_negative, --seed or --negatives_protocol), so its best "
                        f"figures so far cannot be compared with {cache.path}'s: resume with the cache it ran on, "
                        f"or start a new run")
    if key == "validation":
        split = "with a validation split" if there else "without a validation split, so on the validation items"
        raise UserError(f"{what} {path} was trained on this data {split}, but the cache {cache.path} "
                        f"{'has none' if there else 'holds one'}: use the checkpoint with the cache it was trained "
                        f"on, or train on this one")
    raise UserError(f"{what} {path} was trained on another dataset or split of the same shape ({key} "
                    f"{str(there)[:16]} there, {str(here)[:16]} here): use the checkpoint with the dataset it was "
                    f"trained on")


def check_optimizer_state(state, model, path):
    """Refuse an optimizer state whose moments do not fit the model's parameters one for one: torch's
    load_state_dict does not check their shapes, and the fused Adam kernel then crashes the process."""
    params = list(model.parameters())
    try:
        ids = [i for group in state["param_groups"] for i in group["params"]]
        fits = sorted(ids) == list(range(len(params))) and all(
            not isinstance(value, torch.Tensor) or value.dim() == 0 or
            (value.shape == params[i].shape and value.is_floating_point())
            for i in ids for value in state["state"].get(i, {}).values())
    except (KeyError, TypeError, AttributeError, IndexError):
        fits = False
    if not fits:
        raise UserError(f"--resume: the optimizer state in {path} does not fit the model (edited?): resume from a "
                        f"last.pth that ncf.py wrote, or train without --resume")


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
