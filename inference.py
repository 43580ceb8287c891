"""Top-K recommendations, an inference benchmark, and export of a trained model for serving.

Recommend (original MovieLens ids in, original ids out), from a checkpoint or from an export:
    python inference.py recommend --data data/cache/ml-20m --checkpoint data/checkpoints/model.pth --users 12 345
    python inference.py recommend --model data/export/ml-20m --users 12 345 --json
Export the scoring model, the id maps and a manifest (`--format onnx` needs requirements-export.txt):
    python inference.py export --checkpoint data/checkpoints/model.pth --data data/cache/ml-20m \
        --format onnx --output data/export/ml-20m
Benchmark (no data needed: without --checkpoint/--data it builds the default model on ml-20m's shape; a
model or batch that cannot fit in the device's free memory is refused before anything is allocated, and
--json_path replaces only a report this command wrote):
    python inference.py benchmark --batch_sizes 1024 65536 1048576 --precision fp32 amp --device cuda
    python inference.py benchmark --backend torch onnxruntime --precision fp32 --device cpu --batch_sizes 1 1024

A user is never recommended an item they trained on. Their held-out test item may be recommended:
it is an item they really chose, and the full-ranking metric counts exactly that as a hit.

`recommend --model` on an ONNX export needs only numpy and onnxruntime, so a serving machine needs
neither torch nor the training code: this file imports them inside the functions that use them, never
at its top.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before torch starts its thread pool)

import argparse
import contextlib
import functools
import importlib
import itertools
import json
import logging
import os
import sys
import time
import warnings
import zipfile

import numpy as np

import cache_format
from cache_format import file_record
from cli import (EnvironmentFailure, UserError, check_may_write, check_output_folder, identity_mismatch, is_own_folder,
                 json_marker, main_guard, owned_file, staged_folder)

# The export folder: what `export` writes and `recommend --model` reads.
EXPORT_VERSION = 1
CREATED_BY = "inference.py export"
BENCHMARK_CREATED_BY = "inference.py benchmark"  # the created_by of --json_path reports: only those are replaced
MANIFEST_FILE = "manifest.json"  # written last: a folder without it is not a finished export
ID_MAPS_FILE = "id_maps.npz"
MODEL_FILES = {"onnx": "model.onnx", "torch-export": "model.pt2"}
EXPORT_FILES = (MANIFEST_FILE, ID_MAPS_FILE, *MODEL_FILES.values(), "model.onnx.data")  # .data: weights > 2 GiB
INPUTS, OUTPUT = ("user", "item"), "logit"
MAP_KEYS = ("user_ids", "item_ids", "train_ptr", "train_items")  # what id_maps.npz must hold
MAX_ID = 2**31 - 1  # the benchmark draws int32 ids, and the cache stores them as int32
INT64 = (-(2**63), 2**63 - 1)
CHECK_PAIRS = 4096  # random (user, item) pairs on which an export must score as the checkpoint does
TOLERANCE = 1e-5  # fp32 logits, absolute and relative
EXTRAS_HINT = "pip install -r requirements-export.txt (onnx, onnxscript, onnxruntime)"


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    rec = commands.add_parser("recommend", formatter_class=fmt, help="top-K unseen items of some users")
    rec.add_argument("--model", help="export folder written by `inference.py export` (instead of --data and "
                                     "--checkpoint)")
    rec.add_argument("--data", help="dataset cache folder the checkpoint was trained on")
    rec.add_argument("--checkpoint", help="model.pth written by ncf.py")
    rec.add_argument("--users", type=int, nargs="+", required=True, help="ORIGINAL (MovieLens) user ids")
    rec.add_argument("-k", "--topk", type=int, default=10, help="items to recommend per user")
    rec.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="for --checkpoint; an export is served on the CPU")
    rec.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    exp = commands.add_parser("export", formatter_class=fmt, help="scoring model, id maps and manifest for serving")
    exp.add_argument("--checkpoint", required=True, help="model.pth written by ncf.py")
    exp.add_argument("--data", required=True, help="dataset cache the checkpoint was trained on (its id maps and "
                                                   "training items go into the export)")
    exp.add_argument("--format", choices=tuple(MODEL_FILES), default="onnx",
                     help="onnx: served by onnxruntime; torch-export: a torch.export program (.pt2)")
    exp.add_argument("--output", required=True, help="folder to write (an existing one is replaced only if it is "
                                                     "empty or an export of this command)")

    bench = commands.add_parser("benchmark", formatter_class=fmt, help="inference samples/s and latency")
    bench.add_argument("--checkpoint", help="model.pth to time (default: a freshly built model)")
    bench.add_argument("--data", help="dataset cache whose user/item counts shape the model")
    bench.add_argument("--users", type=int, help="users, without --data/--checkpoint (default: ml-20m's)")
    bench.add_argument("--items", type=int, help="items, without --data/--checkpoint (default: ml-20m's)")
    bench.add_argument("-f", "--factors", type=int, help="without --checkpoint (default: ncf.py's)")
    bench.add_argument("--layers", type=int, nargs="+", help="without --checkpoint (default: ncf.py's)")
    bench.add_argument("--batch_sizes", type=int, nargs="+", default=[1024, 65536, 1048576])
    bench.add_argument("--backend", nargs="+", choices=("torch", "onnxruntime"), default=["torch"],
                       help="torch: eager PyTorch; onnxruntime: the model exported to ONNX (fp32 only)")
    bench.add_argument("--precision", nargs="+", choices=("fp32", "amp"), default=["fp32", "amp"],
                       help="amp: fp16 autocast on CUDA, bf16 autocast on CPU")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--iterations", type=int, default=20, help="timed batches per configuration")
    bench.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    bench.add_argument("--json_path", help="also write the JSON results here (a file there is replaced only if it "
                                           "is a report of this command)")
    return parser.parse_args(argv)


def require(what, *names):
    """The optional packages `names` (onnx, onnxscript, onnxruntime), or a one-line error naming the install."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise UserError(f"{what} needs the optional package {name}, which is not installed: "
                            f"{EXTRAS_HINT}") from None
    return modules[0] if len(modules) == 1 else modules


# ---------------------------------------------------------------------------------------------
# Recommendations: numpy only, whatever scores the items.
#
# A scorer is a function (users, items) -> logits: int64 arrays [B] in, a float32 array [B] out. The
# checkpoint's model, an ONNX session and a torch.export program each provide one; `maps` holds what
# a cache or an export knows of the data: original user and item ids, and each user's training items
# (user u's are train_items[train_ptr[u]:train_ptr[u + 1]]).


def dense_user_ids(user_ids, original_ids, source):
    """Dense ids of original user ids; an unknown one is a user error that names it."""
    order = np.argsort(user_ids, kind="stable")
    # An id beyond int64 is no id of any dataset (numpy would overflow on it): unknown, like any other.
    in_range = np.array([INT64[0] <= u <= INT64[1] for u in original_ids])
    wanted = np.asarray([u if ok else -1 for u, ok in zip(original_ids, in_range, strict=True)], dtype=np.int64)
    dense = order[np.searchsorted(user_ids[order], wanted).clip(max=len(user_ids) - 1)]
    found = (user_ids[dense] == wanted) & in_range
    unknown = [str(u)[:40] for u, ok in zip(original_ids, found, strict=True) if not ok]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UserError(f"--users: user id {', '.join(unknown[:5])}{more} not in the dataset {source} "
                        f"({len(user_ids):,} users with ids {user_ids.min()}..{user_ids.max()}): "
                        f"pass original ids of users who have at least the dataset's min_ratings interactions")
    return dense


def sigmoid(logits):
    return 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))  # no overflow warning for large |logits|


def recommend(score, maps, dense_users, k):
    """[(original item ids, probabilities)] per user: the k highest-scored items each user has not trained on."""
    items = np.arange(len(maps["item_ids"]), dtype=np.int64)
    ptr = maps["train_ptr"]
    results = []
    for user in dense_users.tolist():
        logits = score(np.full_like(items, user), items)
        # A non-finite score is never recommended (SPEC §9: it ranks last), nor is a training item.
        eligible = np.isfinite(logits)
        eligible[maps["train_items"][ptr[user] : ptr[user + 1]]] = False
        candidates = np.flatnonzero(eligible)
        # Stable: equal scores keep item order, so every scorer of the same logits gives the same list.
        top = candidates[np.argsort(-logits[candidates], kind="stable")[:k]]
        results.append((maps["item_ids"][top].tolist(), sigmoid(logits[top]).tolist()))
    return results


def run_recommend(args):
    if args.topk <= 0:
        raise UserError(f"--topk must be positive, got {args.topk}")
    if args.model and (args.data or args.checkpoint):
        raise UserError("--model serves an export on its own: pass either --model DIR, or --data and --checkpoint")
    if not args.model and not (args.data and args.checkpoint):
        raise UserError("recommend needs --model DIR (written by `inference.py export`), or both --data (the "
                        "dataset cache) and --checkpoint (model.pth)")
    if args.model:
        if args.device == "cuda":
            raise UserError("--device cuda is for --checkpoint: an export is served on the CPU; drop --device")
        manifest, maps = load_export(args.model)
        dense = dense_user_ids(maps["user_ids"], args.users, args.model)
        score = export_scorer(args.model, manifest)
    else:
        from dataloading import load_cache  # torch and the training code: only for a checkpoint

        cache = load_cache(args.data)
        maps = id_maps(cache)
        dense = dense_user_ids(maps["user_ids"], args.users, args.data)
        score = checkpoint_scorer(args.checkpoint, cache, args.device)
    results = recommend(score, maps, dense, args.topk)
    if args.json:
        source = {"model": args.model} if args.model else {"checkpoint": args.checkpoint}
        print(json.dumps({**source, "topk": args.topk, "recommendations": [
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
# Serving an export: numpy and onnxruntime (torch only for a torch-export program).


def read_manifest(folder):
    """manifest.json of `folder` as a dict; raises ValueError (with the reason) or OSError."""
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict):
        raise ValueError(f"it holds a JSON {type(manifest).__name__}, not an object")
    return manifest


def load_export(folder):
    """The manifest and id maps of an export folder, after checking every file against the manifest and the
    id maps against the model's sizes."""
    fix = "pass a folder written by `inference.py export`, or export again"
    if not os.path.isdir(folder):
        raise UserError(f"--model {folder} is not a folder: {fix}")
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        raise UserError(f"--model {folder} has no {MANIFEST_FILE}, so it is not a finished export: {fix}") from None
    except (OSError, ValueError, RecursionError) as err:
        raise UserError(f"cannot read {os.path.join(folder, MANIFEST_FILE)} ({str(err).splitlines()[0][:100]}): "
                        f"{fix}") from None
    check_manifest(folder, manifest, fix)
    maps = read_id_maps(os.path.join(folder, ID_MAPS_FILE), fix)
    problem = id_maps_problem(maps, manifest["model"]["nb_users"], manifest["model"]["nb_items"]) or \
        identity_problem(maps, manifest)
    if problem:
        raise UserError(f"--model {folder}: {ID_MAPS_FILE} {problem}, so it is not the id maps of this export's "
                        f"model: {fix}")
    return manifest, maps


def check_manifest(folder, manifest, fix):
    """The manifest names a known format, the model's sizes and the export's files, and every file is the
    one it records (size and SHA-256)."""
    if manifest.get("created_by") != CREATED_BY or manifest.get("export_version") != EXPORT_VERSION:
        raise UserError(f"--model {folder}: {MANIFEST_FILE} is not that of a version-{EXPORT_VERSION} export of "
                        f"this code (created_by {manifest.get('created_by')!r:.40}, export_version "
                        f"{manifest.get('export_version')!r:.10}): {fix}")
    files, fmt, model = manifest.get("files"), manifest.get("format"), manifest.get("model")
    if (not isinstance(fmt, str) or fmt not in MODEL_FILES or manifest.get("model_file") != MODEL_FILES[fmt]
            or not isinstance(files, dict) or MODEL_FILES[fmt] not in files or ID_MAPS_FILE not in files):
        raise UserError(f"--model {folder}: {MANIFEST_FILE} does not name a known format and list the export's "
                        f"files: {fix}")
    if not isinstance(model, dict) or not all(is_count(model.get(key)) for key in ("nb_users", "nb_items")):
        raise UserError(f"--model {folder}: {MANIFEST_FILE} does not give the model's user and item counts "
                        f"(\"model\": nb_users, nb_items): {fix}")
    for name, record in files.items():
        path = os.path.join(folder, os.path.basename(name))
        if not os.path.isfile(path):
            raise UserError(f"--model {folder}: {name} is missing: {fix}")
        if file_record(path) != record:
            raise UserError(f"--model {folder}: {name} does not match the size and SHA-256 {MANIFEST_FILE} "
                            f"records (changed since it was exported): {fix}")


def is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def read_id_maps(path, fix):
    """id_maps.npz as a dict of arrays (no pickles), or a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0][:100] if str(err) else type(err).__name__
        raise UserError(f"cannot read {path} ({reason}): {fix}") from None


def identity_problem(maps, manifest):
    """Why the dataset identity the id maps carry is not the manifest's, or None (exports written before the
    id maps carried one are not compared)."""
    if "dataset" not in maps:
        return None
    try:
        carried = json.loads(str(maps["dataset"]))
    except ValueError:
        return "carries an unreadable dataset identity"
    mismatch = identity_mismatch(manifest.get("dataset"), carried if isinstance(carried, dict) else {})
    if mismatch:
        key, there, here = mismatch
        return (f"belongs to another dataset than {MANIFEST_FILE} records ({key} {str(here)[:16]}, not "
                f"{str(there)[:16]})")
    return None


def id_maps_problem(maps, num_users, num_items):
    """Why `maps` are not id maps of a model of `num_users` and `num_items` (see the Recommendations
    section), or None. Checked because `recommend` indexes with them: a cut train_ptr would read another
    user's training items, an item id past the table would raise deep inside numpy."""
    for key in MAP_KEYS:
        value = maps.get(key)
        if value is None:
            return f"lacks {key}"
        if value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
            return f"has a {key} that is not a 1-D integer array ({value.dtype}, shape {value.shape})"
    users, items, ptr, trained = (maps[key] for key in MAP_KEYS)
    sizes = {"user_ids": (len(users), num_users), "item_ids": (len(items), num_items),
             "train_ptr": (len(ptr), num_users + 1)}
    for key, (got, want) in sizes.items():
        if got != want:
            return f"has {got:,} entries in {key}, not the {want:,} the model's sizes call for"
    if ptr[0] != 0 or ptr[-1] != len(trained) or (np.diff(ptr) < 0).any():
        return f"has a train_ptr that does not split train_items ({len(trained):,} entries) into users"
    if len(trained) and (trained.min() < 0 or trained.max() >= num_items):
        return f"has train_items outside 0..{num_items - 1}"
    if len(np.unique(users)) != len(users):
        return "has a user id twice in user_ids"
    return None


def export_scorer(folder, manifest):
    """The export's scorer, tried once on its last user and item: a model file swapped for another export's
    (its checksum updated to match) would otherwise fail deep inside the runtime, or score other ids."""
    path = os.path.join(folder, manifest["model_file"])
    ort = require("recommend --model (an ONNX export)", "onnxruntime") if manifest["format"] == "onnx" else None
    last = np.array([manifest["model"]["nb_users"] - 1]), np.array([manifest["model"]["nb_items"] - 1])
    try:
        score = session_scorer(ort_session(ort, path)) if ort else program_scorer(path)
        logit = np.asarray(score(*last))
        shape_ok = logit.shape == (1,)
    except Exception as err:  # the runtime's own errors: a broken or foreign model file
        text = str(err).strip()
        raise UserError(f"--model {folder}: {manifest['model_file']} cannot score the export's users and items "
                        f"({text.splitlines()[0][:120] if text else type(err).__name__}): export again") from None
    if not shape_ok:
        raise UserError(f"--model {folder}: {manifest['model_file']} returns {logit.shape}-shaped scores, not one "
                        "per pair: export again")
    return score


def program_scorer(path):
    """Scorer of a torch.export program: it needs torch, though not the training code."""
    import torch

    module = torch.export.load(path).module()

    def score(users, items):
        with torch.no_grad():
            return module(torch.from_numpy(users), torch.from_numpy(items)).numpy()

    return score


def ort_session(ort, path, threads=0, providers=("CPUExecutionProvider",)):
    """An onnxruntime session; threads 0 lets onnxruntime choose (one per physical core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings would add stderr lines to a command line
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # onnxruntime's own thread pool spins while waiting, as OpenMP's did (cli.py): the same cure.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=list(providers))


def session_scorer(session):
    def score(users, items):
        return session.run([OUTPUT], {INPUTS[0]: users, INPUTS[1]: items})[0]

    return score


# ---------------------------------------------------------------------------------------------
# The checkpoint side: torch and the training code.


def load_model(path, cache, device):
    import checkpoint

    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist: pass the model.pth that ncf.py wrote")
    return checkpoint.load_model(path, cache, device, "--checkpoint")


def id_maps(cache):
    """What `recommend` needs of a dataset cache, as numpy arrays (see the Recommendations section)."""
    from dataloading import train_positives_csr

    return {"user_ids": cache.user_ids.numpy().astype(np.int64), "item_ids": cache.item_ids.numpy().astype(np.int64),
            "train_ptr": train_positives_csr(cache.train, cache.num_users).numpy(),
            "train_items": cache.train[:, 1].numpy().astype(np.int32)}


def model_scorer(model, device):
    import torch

    def score(users, items):
        with torch.no_grad():
            logits = model(torch.from_numpy(users).to(device), torch.from_numpy(items).to(device))
            return logits.float().cpu().numpy()

    return score


def checkpoint_scorer(path, cache, device_flag):
    from devices import pick_device

    device = pick_device(device_flag)
    return model_scorer(load_model(path, cache, device)[0], device)


# ---------------------------------------------------------------------------------------------
# Export


def is_export_folder(folder):
    """True iff `export` may replace `folder`: it is empty, or provably an export this command wrote
    (manifest.json says so, and it holds nothing but regular files named as an export's)."""
    return is_own_folder(folder, EXPORT_FILES, read_manifest, CREATED_BY)


def no_earlier_file(path):
    """The proof for a file inside a folder being staged: none is needed, as nothing else can be there."""
    return False


def check_export_output(output, inputs):
    """Refuse, before any work, an --output that cannot be written or must not be replaced."""
    check_output_folder(output, inputs, is_export_folder, "an export of inference.py")


@contextlib.contextmanager
def plain_forward(model):
    """The model in eval mode with its CPU kernels off: exporters trace plain torch ops, and the kernels'
    custom autograd functions and in-place tricks compute the same function, so the export loses nothing."""
    was_training, kernels = model.training, model.cpu_kernels
    model.eval()
    model.cpu_kernels = False
    try:
        yield model
    finally:
        model.cpu_kernels = kernels
        model.train(was_training)


def example_inputs(model):
    import torch

    # Two pairs, not one: torch.export would take a batch of 1 for a constant, not a dynamic size. Two
    # tensors, not one twice: the tracer would take the item input for the user input.
    device = model.user_embed.weight.device
    return torch.zeros(2, dtype=torch.long, device=device), torch.zeros(2, dtype=torch.long, device=device)


def dynamic_batch():
    import torch

    batch = torch.export.Dim("batch", min=1)
    return {INPUTS[0]: {0: batch}, INPUTS[1]: {0: batch}}


@contextlib.contextmanager
def quiet_exporter():
    """torch's ONNX exporter logs and warns about things that do not concern an NCF model (torchvision
    missing, skipped constant folding, deprecations): keep the command line's output to its own lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(model, path):
    """The ONNX model through torch's exporter (torch.export based; it needs onnxscript), checked by the onnx
    checker. Returns the manifest's facts about the format."""
    import torch

    onnx, _ = require("export --format onnx", "onnx", "onnxscript")
    with plain_forward(model), quiet_exporter():
        program = torch.onnx.export(model, example_inputs(model), dynamo=True, verbose=False, input_names=list(INPUTS),
                                    output_names=[OUTPUT], dynamic_shapes=dynamic_batch())
        program.save(path)  # the weights go to model.onnx.data only past protobuf's 2 GiB limit
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as err:
        raise EnvironmentFailure(f"the exported model fails the onnx checker ({str(err).splitlines()[0]}); "
                                 "nothing was written: report it with your torch and onnx versions") from None
    imports = onnx.load(path, load_external_data=False).opset_import
    opset = next(o.version for o in imports if o.domain in ("", "ai.onnx"))
    return {"onnx_opset": opset, "onnx": onnx.__version__}


def export_torch_program(model, path):
    """A torch.export program (.pt2), loadable with torch.export.load without this code."""
    import torch

    with plain_forward(model), quiet_exporter():
        program = torch.export.export(model, example_inputs(model), dynamic_shapes=dynamic_batch())
    torch.export.save(program, path)
    return {}


EXPORTERS = {"onnx": export_onnx, "torch-export": export_torch_program}


def check_export(reference, exported, num_users, num_items, pairs=CHECK_PAIRS):
    """Largest |logit difference| between two scorers on `pairs` seeded random pairs; an error past TOLERANCE."""
    rng = np.random.default_rng(0)
    users = rng.integers(num_users, size=pairs, dtype=np.int64)
    items = rng.integers(num_items, size=pairs, dtype=np.int64)
    want, got = reference(users, items), exported(users, items)
    if not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE):
        raise EnvironmentFailure(f"the exported model's logits differ from the checkpoint's by up to "
                                 f"{np.nanmax(np.abs(got - want)):.2e} (> {TOLERANCE}) on {pairs:,} random pairs; "
                                 "nothing was written: report it with your torch and onnx versions")
    return float(np.abs(got - want).max())


def checkpoint_facts(ckpt, path, cache):
    """What the manifest says of the checkpoint, as plain JSON: a checkpoint's optional fields may be edited."""
    def plain(value, kind):
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    # The identity load_model compared with the cache's (through cli.identity_mismatch); a checkpoint older
    # than identities gets the cache's.
    dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else None
    return {"dataset": dataset or cache_format.dataset_identity(cache.metadata),
            "checkpoint": {"path": os.path.abspath(path), "epoch": plain(ckpt.get("epoch"), int),
                           "topk": plain(saved_args.get("topk", 10), int), "hr": plain(ckpt.get("hr"), (int, float)),
                           "ndcg": plain(ckpt.get("ndcg"), (int, float))}}


def run_export(args):
    check_export_output(args.output, {"--checkpoint": args.checkpoint, "--data": args.data})
    # The extras are checked before any work, as the output path is.
    ort = require("export --format onnx", "onnx", "onnxscript", "onnxruntime")[-1] if args.format == "onnx" else None
    import torch

    from dataloading import load_cache

    cache = load_cache(args.data)
    model, ckpt = load_model(args.checkpoint, cache, torch.device("cpu"))
    reference = model_scorer(model, torch.device("cpu"))
    with staged_folder(args.output, is_export_folder, "export") as tmp:
        model_path = os.path.join(tmp, MODEL_FILES[args.format])
        facts = EXPORTERS[args.format](model, model_path)
        if args.format == "onnx":
            exported, runtime = session_scorer(ort_session(ort, model_path)), f"onnxruntime {ort.__version__}"
        else:
            exported, runtime = program_scorer(model_path), f"torch {torch.__version__}"
        max_diff = check_export(reference, exported, cache.num_users, cache.num_items)
        known = checkpoint_facts(ckpt, args.checkpoint, cache)
        with owned_file(os.path.join(tmp, ID_MAPS_FILE), "--output", no_earlier_file, "id maps") as f:
            # The dataset's identity travels with the id maps too: maps swapped in from another export are refused.
            np.savez(f, **id_maps(cache), dataset=np.array(json.dumps(known["dataset"], sort_keys=True)))
        manifest = {
            "created_by": CREATED_BY, "export_version": EXPORT_VERSION, "format": args.format,
            "model_file": MODEL_FILES[args.format],
            "inputs": {name: {"dtype": "int64", "shape": ["batch"], "range": [0, count - 1]}
                       for name, count in zip(INPUTS, (cache.num_users, cache.num_items), strict=True)},
            "output": {OUTPUT: {"dtype": "float32", "shape": ["batch"], "meaning": "logit; sigmoid gives the "
                                                                                    "probability"}},
            "model": ckpt["config"], **known,
            "torch": torch.__version__, **facts,
            "check": {"pairs": CHECK_PAIRS, "max_abs_logit_diff": max_diff, "tolerance": TOLERANCE,
                      "runtime": runtime},
            "files": {name: file_record(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
        }
        with owned_file(os.path.join(tmp, MANIFEST_FILE), "--output", json_marker(CREATED_BY), "a manifest") as f:
            f.write(json.dumps(manifest, indent=1).encode())
    print(f"exported {args.checkpoint} ({args.format}) to {args.output}: {', '.join(manifest['files'])}, "
          f"{MANIFEST_FILE}; logits equal the checkpoint's to {max_diff:.1e} on {CHECK_PAIRS:,} random pairs")


# ---------------------------------------------------------------------------------------------
# Benchmark


SHAPE_FLAGS = (("--users", "users"), ("--items", "items"), ("--factors", "factors"), ("--layers", "layers"))
GIB = 2**30


def check_benchmark_flags(args):
    """Every benchmark flag and the --json_path, before any work (a report is written after minutes)."""
    for flag, values in (("--batch_sizes", args.batch_sizes), ("--iterations", [args.iterations])):
        if min(values) <= 0:
            raise UserError(f"{flag} must be positive, got {min(values)}")
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
        check_may_write(args.json_path, "--json_path", json_marker(BENCHMARK_CREATED_BY), "a benchmark report")


def fresh_config(args, cache):
    """The config of the model to build: --data's counts, or the flags, or ml-20m's shape and ncf.py's model."""
    import synthetic
    from neumf import DROPOUT, FACTORS, LAYERS

    users, items = (cache.num_users, cache.num_items) if cache else synthetic.PRESETS["ml-20m"][:2]
    return {"nb_users": users if args.users is None else args.users,
            "nb_items": items if args.items is None else args.items,
            "mf_dim": FACTORS if args.factors is None else args.factors,
            "mlp_layer_sizes": list(LAYERS if args.layers is None else args.layers), "dropout": DROPOUT}


def benchmark_model(args, device):
    """The model to time and a short description of where its shape came from; refused before it is built
    if it, or it and the largest batch's activations, do not fit in the device's memory."""
    import torch

    from dataloading import load_cache
    from neumf import build_model

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
    import devices

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


def amp_precision(device):
    """fp16 autocast on CUDA (the recipe's), bf16 autocast on CPU (torch has no fp16 CPU autocast path)."""
    from devices import choose_precision

    return choose_precision("O2", "float16" if device.type == "cuda" else "bfloat16", device)


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
    import torch

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


def run_benchmark(args):
    import tempfile

    import torch

    from devices import choose_precision, cpu_has_native_bf16, pick_device

    check_benchmark_flags(args)
    ort = (require("benchmark --backend onnxruntime", "onnx", "onnxscript", "onnxruntime")[-1]
           if "onnxruntime" in args.backend else None)
    device = pick_device(args.device)
    providers = onnxruntime_providers(ort, device) if ort else None
    model, source = benchmark_model(args, device)
    with tempfile.TemporaryDirectory() as folder:
        if ort:  # the same model, exported as `inference.py export` does, with torch's thread count
            path = os.path.join(folder, MODEL_FILES["onnx"])
            export_onnx(model, path)
            onnx_score = session_scorer(ort_session(ort, path, torch.get_num_threads(), providers))
        generator = torch.Generator().manual_seed(0)
        results = []
        for batch in args.batch_sizes:
            users = torch.randint(model.nb_users, (batch,), generator=generator, dtype=torch.int32)
            items = torch.randint(model.nb_items, (batch,), generator=generator, dtype=torch.int32)
            for backend in args.backend:
                for requested in args.precision:
                    if backend == "onnxruntime" and requested != "fp32":
                        continue  # the ONNX model is fp32; print_table says so
                    if backend == "torch":
                        precision = (choose_precision("O0", "auto", device) if requested == "fp32"
                                     else amp_precision(device))
                        run = torch_runner(model, users.to(device), items.to(device), precision, device)
                        precision_run = precision.name
                    else:
                        run = functools.partial(onnx_score, users.long().numpy(), items.long().numpy())
                        precision_run = "fp32"
                    seconds = time_calls(run, args.iterations, args.warmup)
                    results.append({
                        "backend": backend, "batch_size": batch, "precision": requested,
                        "precision_run": precision_run, "samples_per_s": batch * len(seconds) / seconds.sum(),
                        "latency_p50_ms": float(np.percentile(seconds, 50) * 1e3),
                        "latency_p99_ms": float(np.percentile(seconds, 99) * 1e3),
                        "iterations": args.iterations,
                    })
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
        with owned_file(args.json_path, "--json_path", json_marker(BENCHMARK_CREATED_BY), "a benchmark report") as f:
            f.write(json.dumps({"created_by": BENCHMARK_CREATED_BY, **report}, indent=1).encode())


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
def main(argv=None):
    args = parse_args(argv)
    {"recommend": run_recommend, "export": run_export, "benchmark": run_benchmark}[args.command](args)


if __name__ == "__main__":
    main()
