"""Recommendations: the top-K unseen items of users, in original ids, from an export or a checkpoint.

    python inference.py recommend --model data/export/ml-20m --users 12 345 --json
    python inference.py recommend --data data/cache/ml-20m --checkpoint data/checkpoints/model.pth --users 12 345
    python inference.py recommend --model data/export/ml-20m --all_users --output recs.parquet
    python inference.py recommend --model data/export/ml-20m --users_file users.txt -k 20 --output recs.csv

This is what a serving machine runs, so its imports, all at the top, are numpy, tqdm and the project's
torch-free modules (cli.py, cache_format.py, recommendation_files.py: the CSV and Parquet files). Three
things are loaded only where they are asked for: onnxruntime and pyarrow, optional extras whose absence
must be a one-line error rather than an import failure; and torch, for a checkpoint (export.py) or a
torch.export program. `recommend --model` on an ONNX export therefore never loads torch or the training
code (tests/test_export.py and tests/test_batch_recommend.py check sys.modules).

A user is never recommended an item they trained on, nor one whose score is not finite. Their held-out test
item may be recommended: it is an item they really chose, and the full-ranking metric counts exactly that
as a hit. Every path (a table, JSON, a CSV or Parquet file) ranks through `ranked`, chunk by chunk.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before anything starts a thread pool)

import importlib
import json
import os
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import recommendation_files
from cache_format import file_record
from cli import EnvironmentFailure, UserError, identity_mismatch, main_guard

# The export folder: what `inference.py export` (export.py) writes and `recommend --model` reads.
EXPORT_VERSION = 1
EXPORT_CREATED_BY = "inference.py export"
MANIFEST_FILE = "manifest.json"  # written last: a folder without it is not a finished export
ID_MAPS_FILE = "id_maps.npz"
MODEL_FILES = {"onnx": "model.onnx", "torch-export": "model.pt2"}
EXPORT_FILES = (MANIFEST_FILE, ID_MAPS_FILE, *MODEL_FILES.values(), "model.onnx.data")  # .data: weights > 2 GiB
INPUTS, OUTPUT = ("user", "item"), "logit"
MAP_KEYS = ("user_ids", "item_ids", "train_ptr", "train_items")  # what id_maps.npz must hold
FINGERPRINT_KEYS = ("fingerprint_users", "fingerprint_items", "fingerprint_logits")  # and holds since the fingerprint
FINGERPRINT_TOLERANCE = 1e-4  # fp32 logits of one model through two runtimes agree to 1e-5 (export's check)
MAX_ID = 2**31 - 1  # the cache stores ids as int32
INT64 = (-(2**63), 2**63 - 1)
EXTRAS_HINT = "pip install -r requirements-export.txt (onnx, onnxscript, onnxruntime)"

# Recommendations in chunks.
DEFAULT_CHUNK_USERS = 1024
CHUNK_ROWS = 2**24  # recommendations held before they are written (~40 bytes each): caps chunk_users x topk
ONNX_PAIRS_PER_CALL = 2**16  # an ONNX session holds every activation of a call: about 2.3 KB a pair


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
# Ranking: numpy only, whatever scores the items.
#
# A source scores whole users: score_users(dense user ids [n]) -> float32 logits [n, items]. `maps` holds
# what a cache or an export knows of the data: original user and item ids, and each user's training items
# (user u's are train_items[train_ptr[u]:train_ptr[u + 1]]).


@dataclass(frozen=True)
class Source:
    maps: dict
    score_users: object
    users_per_call: int  # users scored in one call: what bounds the scorer's memory
    facts: dict  # what a recommendations file records of its model and data


def dense_user_ids(user_ids, original_ids, source, flag="--users"):
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
        raise UserError(f"{flag}: user id {', '.join(unknown[:5])}{more} not in the dataset {source} "
                        f"({len(user_ids):,} users with ids {user_ids.min()}..{user_ids.max()}): "
                        f"pass original ids of users who have at least the dataset's min_ratings interactions")
    return dense


def sigmoid(logits):
    return 0.5 * (1.0 + np.tanh(0.5 * logits.astype(np.float64)))  # no overflow warning for large |logits|


def ranked(logits, maps, users, k):
    """Per user (dense ids `users`; row r of `logits` scores every item for users[r]): the indices of the k
    highest-scored items the user has not trained on, best first. A non-finite score never ranks,
    and equal scores keep item order (a stable sort), so every scorer of the same logits, in chunks of any
    size, gives the same lists."""
    ptr, trained = maps["train_ptr"], maps["train_items"]
    order = np.where(np.isfinite(logits), -logits, np.inf)  # ascending = best first; inf = never
    for row, user in enumerate(users.tolist()):
        order[row, trained[ptr[user] : ptr[user + 1]]] = np.inf
    k = min(k, order.shape[1])
    # Only items scored at least as high as the k-th best can be in the list: sort those, not every item.
    kth = np.partition(order, k - 1, axis=1)[:, k - 1 : k]
    tops = []
    for row, bound in zip(order, kth, strict=True):
        candidates = np.flatnonzero((row <= bound) & (row < np.inf))
        tops.append(candidates[np.argsort(row[candidates], kind="stable")[:k]])
    return tops


def recommendation_chunks(source, dense_users, k, chunk_users, progress=None):
    """Yield, per chunk of at most `chunk_users` users: (recommendations per user, rows), rows being
    recommendation_files.COLUMNS as arrays (original user and item ids, rank from 1, probability). Memory:
    the scorer's for users_per_call users, and the chunk's rows."""
    maps = source.maps
    for lo in range(0, len(dense_users), chunk_users):
        chunk = dense_users[lo : lo + chunk_users]
        tops, logits = [], []
        for start in range(0, len(chunk), source.users_per_call):
            users = chunk[start : start + source.users_per_call]
            scores = source.score_users(users)
            for row, top in zip(scores, ranked(scores, maps, users, k), strict=True):
                tops.append(top)
                logits.append(row[top])
        counts = np.array([len(top) for top in tops])
        yield counts, {"user": np.repeat(maps["user_ids"][chunk], counts),
                       "rank": np.concatenate([np.arange(1, n + 1, dtype=np.int32) for n in counts]),
                       "item": maps["item_ids"][np.concatenate(tops)],
                       "score": sigmoid(np.concatenate(logits))}
        if progress is not None:
            progress.update(len(chunk))


def recommend(source, dense_users, k, chunk_users=DEFAULT_CHUNK_USERS):
    """[(original item ids, probabilities)] per user: the k highest-scored items each user has not trained on."""
    results = []
    for counts, rows in recommendation_chunks(source, dense_users, k, chunk_users):
        ends = np.cumsum(counts)
        results += [(rows["item"][end - n : end].tolist(), rows["score"][end - n : end].tolist())
                    for n, end in zip(counts.tolist(), ends.tolist(), strict=True)]
    return results


def rows_of_pairs(score, num_items):
    """score_users of a pair scorer score(users [B], items [B]) -> logits [B] (an ONNX session's interface)."""
    items = np.arange(num_items, dtype=np.int64)

    def score_users(users):
        logits = score(np.repeat(users.astype(np.int64), num_items), np.tile(items, len(users)))
        return np.asarray(logits, dtype=np.float32).reshape(len(users), num_items)

    return score_users


# ---------------------------------------------------------------------------------------------
# Serving an export: numpy and onnxruntime (torch only for a torch.export program).


def read_manifest(folder):
    """manifest.json of `folder` as a dict; raises ValueError (with the reason) or OSError."""
    with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
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
    if manifest.get("dataset_checked") is False:
        warnings.warn(f"--model {folder} was exported from a checkpoint that records no dataset (an NVIDIA-format "
                      f"one): its id maps are those of the cache given to export, which nothing shows the model was "
                      f"trained on", stacklevel=2)
    return manifest, maps


def check_manifest(folder, manifest, fix):
    """The manifest names a known format, the model's sizes and the export's files, and every file is the
    one it records (size and SHA-256)."""
    if manifest.get("created_by") != EXPORT_CREATED_BY or manifest.get("export_version") != EXPORT_VERSION:
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
    """Why `maps` are not id maps of a model of `num_users` and `num_items` (see the Ranking section), or
    None. Checked because ranking indexes with them: a cut train_ptr would read another user's training
    items, an item id past the table would raise deep inside numpy."""
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
    if any(key in maps for key in FINGERPRINT_KEYS):
        arrays = [maps.get(key) for key in FINGERPRINT_KEYS]
        shaped = all(isinstance(a, np.ndarray) and a.ndim == 1 for a in arrays) and len(set(map(len, arrays))) == 1
        if not shaped or [a.dtype for a in arrays] != [np.int64, np.int64, np.float32] or \
                not all(ids.min(initial=0) >= 0 and ids.max(initial=0) < count
                        for ids, count in zip(arrays[:2], (num_users, num_items), strict=True)):
            return "has a fingerprint that is not int64 pairs of the model's ids with float32 logits"
    return None


def export_scorer(folder, manifest, maps):
    """The export's pair scorer, tried once on its last user and item and on the id maps' fingerprint pairs: a
    model file swapped for another export's (its checksum updated to match) would otherwise fail deep inside
    the runtime, or score other ids, or another dataset's model of the same shape."""
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
    if "fingerprint_logits" in maps:  # exports written before the id maps carried one are not compared
        want = maps["fingerprint_logits"]
        got = np.asarray(score(maps["fingerprint_users"], maps["fingerprint_items"]))
        tolerance = FINGERPRINT_TOLERANCE
        if got.shape != want.shape or not np.allclose(got, want, rtol=tolerance, atol=tolerance):
            raise UserError(f"--model {folder}: {manifest['model_file']} does not score as the model exported with "
                            f"{ID_MAPS_FILE} did (a model file of another export?): export again")
    return score


def program_scorer(path):
    """Pair scorer of a torch.export program: it needs torch, though not the training code."""
    import torch  # only for this format: an ONNX export is served without torch

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


def export_source(folder):
    """The Source of an export folder, scored in fp32 on the CPU."""
    manifest, maps = load_export(folder)
    num_items = len(maps["item_ids"])
    facts = {"model": os.path.abspath(folder), "format": manifest["format"], "dataset": manifest.get("dataset"),
             "checkpoint": manifest.get("checkpoint"), "precision": "fp32"}
    return Source(maps, rows_of_pairs(export_scorer(folder, manifest, maps), num_items),
                  max(1, ONNX_PAIRS_PER_CALL // num_items), facts)


def write_recommendations(source, dense_users, k, chunk_users, output, progress):
    """Every user's recommendations into `output`, chunk by chunk; (users, rows, seconds)."""
    description = {"format_version": 1, "topk": k, "users": len(dense_users), "columns": {
        "user": "original user id", "rank": "1 = best", "item": "original item id",
        "score": "probability (sigmoid of the model's logit)"}, "training_items_excluded": True, **source.facts}
    start, rows = time.perf_counter(), 0
    bar = tqdm(total=len(dense_users), unit="user", desc="recommend", file=sys.stderr, disable=not progress)
    try:
        with bar, recommendation_files.writer(output, description) as write:
            for _, chunk in recommendation_chunks(source, dense_users, k, chunk_users, bar):
                write(chunk)
                rows += len(chunk["user"])
    except OSError as err:  # a full disk: owned_file has removed the partial file by now
        raise EnvironmentFailure(f"cannot write --output {output} ({err.strerror or err}); nothing was left "
                                 "behind: free some space or choose another path, and rerun") from None
    return len(dense_users), rows, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The command line: python inference.py recommend ...


def parse_args(argv=None, prog=None):
    parser = cli.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="export folder written by `inference.py export` (instead of --data and "
                                        "--checkpoint)")
    parser.add_argument("--data", help="dataset cache folder the checkpoint was trained on")
    parser.add_argument("--checkpoint", help="model.pth written by ncf.py")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", type=int, nargs="+", help="ORIGINAL (MovieLens) user ids")
    who.add_argument("--users_file", help="text file of original user ids, one a line (# comments and blank "
                                          "lines skipped); needs --output")
    who.add_argument("--all_users", action="store_true", help="every user of the dataset; needs --output")
    parser.add_argument("-k", "--topk", type=int, default=10, help="items to recommend per user")
    parser.add_argument("--output", help="write FILE.csv or FILE.parquet (the suffix sets the format) instead of "
                                         "printing; a file there is replaced only if this command wrote it")
    parser.add_argument("--chunk_users", type=int, help=f"users ranked and written at a time (default "
                                                        f"{DEFAULT_CHUNK_USERS:,}, fewer if -k is large)")
    parser.add_argument("--precision", choices=("fp32", "amp"), default="fp32",
                        help="for --checkpoint: amp is bf16 autocast on CPU, fp16 on CUDA (faster where the "
                             "hardware has it; scores move by ~1e-2, so near-ties may reorder)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="for --checkpoint; an export is served on the CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar while writing --output")
    return parser.parse_args(argv)


def check_flags(args):
    """Every flag of `recommend`, and --output, before any work."""
    for flag, value in (("--topk", args.topk), ("--chunk_users", args.chunk_users)):
        if value is not None and value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.model and (args.data or args.checkpoint):
        raise UserError("--model serves an export on its own: pass either --model DIR, or --data and --checkpoint")
    if not args.model and not (args.data and args.checkpoint):
        raise UserError("recommend needs --model DIR (written by `inference.py export`), or both --data (the "
                        "dataset cache) and --checkpoint (model.pth)")
    if args.model and args.device == "cuda":
        raise UserError("--device cuda is for --checkpoint: an export is served on the CPU; drop --device")
    if args.model and args.precision != "fp32":
        raise UserError("--precision amp is for --checkpoint: an export scores in fp32; drop --precision")
    if not args.output and not args.users:
        raise UserError(f"{'--all_users' if args.all_users else '--users_file'} writes a file: add --output "
                        "FILE.parquet or FILE.csv")
    if args.output and args.json:
        raise UserError("--json prints the recommendations and --output writes them to a file: pass one")
    if args.output:
        recommendation_files.check_output(args.output)


def read_users_file(path):
    """The original user ids of --users_file, in order, each once (a repeated one is written once, and said)."""
    if not os.path.isfile(path):
        raise UserError(f"--users_file {path} is not a file: pass a text file of original user ids, one a line")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--users_file {path}: cannot read it ({getattr(err, 'strerror', None) or err}): pass a "
                        "text file of original user ids, one a line") from None
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise UserError(f"--users_file {path}: line {number} ({text[:40]!r}) is not a user id: give one "
                            "original user id a line (blank lines and lines starting with # are skipped)") from None
    if not ids:
        raise UserError(f"--users_file {path} holds no user ids: give one original user id a line")
    unique = list(dict.fromkeys(ids))
    if len(unique) < len(ids):
        print(f"note: {len(ids) - len(unique):,} repeated user id(s) in {path}: each user is written once",
              file=sys.stderr)
    return unique


def unique_users(ids):
    """--users in order, each once: a repeated one is written once, and said (as --users_file does)."""
    unique = list(dict.fromkeys(ids or []))
    if ids and len(unique) < len(ids):
        print(f"note: {len(ids) - len(unique):,} repeated user id(s) in --users: each user is written once",
              file=sys.stderr)
    return unique or ids


def load_source(args):
    if args.model:
        return export_source(args.model)
    import export  # torch and the training code: only for a checkpoint, so that --model stays without them

    return export.checkpoint_source(args.data, args.checkpoint, args.device, args.precision)


def chunk_size(args, num_items, num_users):
    """--chunk_users, or its default: at most CHUNK_ROWS recommendations held at once."""
    k = min(args.topk, num_items)
    if args.chunk_users is None:
        return max(1, min(DEFAULT_CHUNK_USERS, CHUNK_ROWS // k))
    if min(args.chunk_users, num_users) * k > CHUNK_ROWS:
        raise UserError(f"--chunk_users {args.chunk_users:,} with --topk {args.topk:,} holds "
                        f"{min(args.chunk_users, num_users) * k:,} recommendations at once, more than "
                        f"{CHUNK_ROWS:,}: use --chunk_users {max(1, CHUNK_ROWS // k):,} or fewer")
    return args.chunk_users


def run_recommend(args):
    check_flags(args)
    wanted = read_users_file(args.users_file) if args.users_file else unique_users(args.users)
    source = load_source(args)
    user_ids = source.maps["user_ids"]
    if args.all_users:
        dense = np.arange(len(user_ids))
    else:
        flag = f"--users_file {args.users_file}" if args.users_file else "--users"
        dense = dense_user_ids(user_ids, wanted, args.model or args.data, flag)
    chunk = chunk_size(args, len(source.maps["item_ids"]), len(dense))
    if args.output:
        progress = not args.no_progress and sys.stderr.isatty()
        users, rows, seconds = write_recommendations(source, dense, args.topk, chunk, args.output, progress)
        print(f"wrote the top {args.topk} unseen items of {users:,} users ({rows:,} rows) to {args.output} in "
              f"{seconds:.1f} s ({users / max(seconds, 1e-9):,.1f} users/s)")
        return
    print_recommendations(args, recommend(source, dense, args.topk, chunk))


def print_recommendations(args, results):
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


@main_guard
def main(argv=None, prog=None):
    run_recommend(parse_args(argv, prog))


if __name__ == "__main__":  # python serving.py ARGS: inference.py recommend without the training code
    main()
