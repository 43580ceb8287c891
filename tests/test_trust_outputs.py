"""No silent wrong answer, no lost file, for the commands that serve and measure models: inference.py
recommend/export/benchmark, benchmarks/*.py and python -m logger.plot.

The bad-input table runs each command's main(argv) in-process on tiny data (an untrained model of the tiny
dataset, exported as a torch.export program) and asserts the contract of every row: the exit status (2 for
bad input), exactly one stderr line, no traceback, and every file and folder the user had byte-for-byte
unchanged, nothing added. The tests after it pin each fix of issue 20 with the case that showed the bug.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_MODEL, load_benchmark, make_tiny_cache

import cache_format
import checkpoint
import devices
import export
import inference
import serving
from cache_format import file_record
from dataloading import load_cache
from logger import plot
from neumf import build_model

sys.path.insert(0, str(ROOT / "benchmarks"))
import batch_recommend_benchmark
import convert_benchmark
import inference_benchmark
import planted_ceiling
import stability
import sync_check

throughput = load_benchmark("throughput")

MAINS = {"inference": inference.main, "stability": stability.main, "throughput": throughput.main,
         "convert_benchmark": convert_benchmark.main, "planted_ceiling": planted_ceiling.main,
         "sync_check": sync_check.main, "plot": plot.main, "batch_recommend_benchmark": batch_recommend_benchmark.main}
# A benchmark that, were a check missing, would still end in a second rather than time ml-20m batches.
QUICK = ["--device", "cpu", "--precision", "fp32", "--iterations", "1", "--warmup", "0"]
TINY_THROUGHPUT = ["--device", "cpu", "--users", "300", "--items", "100", "--positives", "5000", "--eval_users", "100",
                   "--factors", "8", "--layers", "16", "8", "--warmup", "1", "--steps", "2", "--no_floor",
                   "--precision", "fp32", "--batch_size", "1024"]
PNG = b"\x89PNG\r\n\x1a\n"


def handmade_checkpoint(cache_dir, path):
    """model.pth of an untrained model of the cache, as ncf.py writes it (checkpoint.payload)."""
    cache = load_cache(str(cache_dir))
    model = build_model({"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.0}, torch.device("cpu"))
    torch.save(checkpoint.payload(model, {"topk": 10}, cache_format.dataset_identity(cache.metadata), 1,
                                  {"hr": 0.5, "ndcg": 0.3}), path)
    return path


def log_lines(epochs=2):
    lines = [{"event": "config", "args": {"topk": 10}, "precision": "fp32"}]
    lines += [{"event": "epoch", "epoch": e, "loss": 0.5 / e, "hr": 0.4, "ndcg": 0.2} for e in range(1, epochs + 1)]
    return "".join(json.dumps(line) + "\n" for line in lines)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two caches of the same shape from different source files, a checkpoint and an export of each, and
    files of the user's: everything the table's rows point at lives under workspace["root"]."""
    root = tmp_path_factory.mktemp("trust-outputs")
    w = {"root": root, "cache": make_tiny_cache(root / "a"), "other": make_tiny_cache(root / "b", seed=1)}
    w["ck"] = handmade_checkpoint(w["cache"], root / "model.pth")
    w["ck_other"] = handmade_checkpoint(w["other"], root / "other.pth")
    for name, ck, cache in (("export", w["ck"], w["cache"]), ("export_other", w["ck_other"], w["other"])):
        w[name] = root / name
        inference.main(["export", "--checkpoint", str(ck), "--data", str(cache), "--format", "torch-export",
                        "--output", str(w[name])])
    w["user"] = str(load_cache(str(w["cache"])).user_ids[0].item())
    (root / "mine.json").write_text('{"my": "notes"}\n')
    (root / "mine.png").write_bytes(PNG + b"a picture of mine")
    (root / "mine.pdf").write_bytes(b"%PDF-1.4 a paper of mine")
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("mine")
    (root / "log.json").write_text(log_lines())
    (root / "mine.csv").write_text("user,rank,item,score\n1,1,2,0.5\n")
    (root / "mine.parquet").write_bytes(b"PAR1 a table of mine PAR1")
    return w


def case_dir(w, name):
    folder = w["root"] / "cases" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def edited_export(w, name, maps=None, manifest=None, hash_updated=True, source="export"):
    """A copy of the export with its id maps and/or manifest changed; the manifest's checksum of id_maps.npz
    is updated to match unless `hash_updated` is False."""
    folder = case_dir(w, name) / "export"
    shutil.copytree(w[source], folder)
    if maps:
        with np.load(folder / "id_maps.npz", allow_pickle=False) as npz:
            arrays = maps({key: npz[key] for key in npz.files})
        if isinstance(arrays, bytes):
            (folder / "id_maps.npz").write_bytes(arrays)
        else:
            with open(folder / "id_maps.npz", "wb") as f:
                np.savez(f, **arrays)
    content = json.loads((folder / "manifest.json").read_text())
    if hash_updated:
        content["files"]["id_maps.npz"] = file_record(folder / "id_maps.npz")
    if manifest:
        content = manifest(content)
    (folder / "manifest.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def with_file_of(w, name, source, target, hash_updated=True):
    """A copy of the export whose `target` file is replaced by `source` (bytes), the checksum updated."""
    folder = case_dir(w, name) / "export"
    shutil.copytree(w["export"], folder)
    (folder / target).write_bytes(source)
    content = json.loads((folder / "manifest.json").read_text())
    if hash_updated:
        content["files"][target] = file_record(folder / target)
    (folder / "manifest.json").write_text(json.dumps(content))
    return folder


def smaller_program(w):
    """A torch.export program of a model with fewer users than the export's: what a swapped model.pt2 holds."""
    path = w["root"] / "cases" / "small.pt2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_model({"nb_users": 5, "nb_items": 5, "mf_dim": 4, "mlp_layer_sizes": [8, 4], "dropout": 0.0},
                            torch.device("cpu"))
        export.export_torch_program(model, str(path))
    return path.read_bytes()


def one_user_more(manifest):
    return {**manifest, "model": {**manifest["model"], "nb_users": manifest["model"]["nb_users"] + 1}}


def pickled_maps(maps):
    return {**maps, "train_ptr": np.array([object()] * len(maps["train_ptr"]), dtype=object)}


def pickle_npz(maps):
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **pickled_maps(maps))
    return buffer.getvalue()


def recommend(w, model, *extra):
    return ["recommend", "--model", model, "--users", w["user"], *extra]


def everyone(w, *extra, output=None, users=None):
    """recommend --all_users (or --users_file `users`) of the export into `output` (default: a new file)."""
    who = ["--users_file", users] if users else ["--all_users"]
    return ["recommend", "--model", w["export"], *who, "--output", output or w["root"] / "cases" / "new.parquet",
            *extra]


def users_file(w, name, text, file_name="users.txt"):
    path = case_dir(w, name) / file_name
    path.write_text(text)
    return path


def bench(*extra):
    return ["benchmark", *QUICK, "--batch_sizes", "8", "--users", "10", "--items", "10", "--factors", "4",
            "--layers", "8", "4", *extra]


def tiny_batch(*extra):
    """batch_recommend_benchmark.py on a shape that, were a check missing, would still end in seconds."""
    return ["--users", "300", "--items", "200", "--positives", "6000", "--users_timed", "10", "--source", "checkpoint",
            "--precision", "fp32", *extra]


def stability_output(w, name, files):
    """A folder that stability.py wrote (its report says so) with `files` ({name: bytes}) added."""
    folder = case_dir(w, name) / "runs"
    folder.mkdir()
    (folder / "stability.json").write_text(json.dumps({"created_by": stability.CREATED_BY, "complete": True}))
    for file, content in files.items():
        (folder / file).write_bytes(content)
    return folder


def stab(w, *extra, output=None):
    return ["--data", w["cache"], "--output", output or w["root"] / "cases" / "stab-new", *extra]


def workdir_with(w, name, files):
    folder = case_dir(w, name)
    for file, content in files.items():
        (folder / "default" / file).parent.mkdir(parents=True, exist_ok=True)
        (folder / "default" / file).write_bytes(content)
    return ["--preset", "default", "--workdir", folder]


def our_ratings_edited(w):
    argv = workdir_with(w, "ratings-edited", {"ratings.csv": b"userId,movieId,rating,timestamp\n1,2,3,4\n"})
    folder = argv[-1] / "default"
    (folder / "ratings.json").write_text(json.dumps({"created_by": convert_benchmark.CREATED_BY, "preset": "default",
                                                     "file": file_record(folder / "ratings.csv")}))
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3,5\n")
    return argv


def throughput_log_with_a_foreign_line(w):
    path = case_dir(w, "tp-log") / "t.jsonl"
    path.write_text(json.dumps({"created_by": throughput.CREATED_BY}) + "\n" + '{"mine": 1}\n')
    return path


def foreign_cache_folder(w):
    argv = workdir_with(w, "cb-cache", {"cache/notes.txt": b"mine"})
    return argv


def nvidia_export(w, ck, output):
    return ["export", "--format", "nvidia", "--checkpoint", ck, "--data", w["cache"], "--output", output]


# (case, command, argv builder, words the one stderr line must contain); every row expects exit status 2.
BAD_INPUTS = [
    # ---- inference.py recommend --model (an export) and --checkpoint
    ("recommend: user id beyond int64", "inference", lambda w: recommend(w, w["export"], "--users", str(2**70)),
     ["--users", "not in the dataset"]),
    ("recommend: user id beyond int64, checkpoint", "inference",
     lambda w: ["recommend", "--data", w["cache"], "--checkpoint", w["ck"], "--users", str(-(2**64)), "--device",
                "cpu"], ["--users", "not in the dataset"]),
    ("recommend: topk 0", "inference", lambda w: recommend(w, w["export"], "--topk", "0"), ["--topk"]),
    ("recommend: --model a file", "inference", lambda w: recommend(w, w["root"] / "mine.json"), ["not a folder"]),
    ("recommend: --model a foreign folder", "inference", lambda w: recommend(w, w["root"] / "notes"),
     ["no manifest.json"]),
    ("recommend: manifest cut short", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-cut", manifest=lambda m: json.dumps(m)[:50])), ["cannot read"]),
    ("recommend: manifest a list", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-list", manifest=lambda m: [m])), ["not an object"]),
    ("recommend: manifest nested too deeply", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-deep", manifest=lambda m: "[" * 100_000 + "]" * 100_000)),
     ["cannot read"]),
    ("recommend: manifest of someone else", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-other", manifest=lambda m: {**m, "created_by": "me"})),
     ["not that of a version-1 export"]),
    ("recommend: manifest without counts", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-counts", manifest=lambda m: {**m, "model": {"nb_users": "3"}})),
     ["user and item counts"]),
    ("recommend: manifest with one user more", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-users", manifest=one_user_more)), ["id_maps.npz", "user_ids"]),
    ("recommend: manifest of an unknown format", "inference",
     lambda w: recommend(w, edited_export(w, "manifest-format", manifest=lambda m: {**m, "format": "onnx"})),
     ["known format"]),
    ("recommend: id maps without train_ptr", "inference", lambda w: recommend(w, edited_export(
        w, "no-ptr", maps=lambda m: {k: v for k, v in m.items() if k != "train_ptr"})), ["lacks train_ptr"]),
    ("recommend: id maps with train_ptr cut", "inference", lambda w: recommend(w, edited_export(
        w, "cut-ptr", maps=lambda m: {**m, "train_ptr": m["train_ptr"][:-10]})), ["train_ptr"]),
    ("recommend: id maps with train_ptr reordered", "inference", lambda w: recommend(w, edited_export(
        w, "ptr-order", maps=lambda m: {**m, "train_ptr": m["train_ptr"][::-1].copy()})), ["train_ptr"]),
    ("recommend: id maps with items past the table", "inference", lambda w: recommend(w, edited_export(
        w, "items-oor", maps=lambda m: {**m, "train_items": m["train_items"] + 10_000})), ["train_items outside"]),
    ("recommend: id maps of float ids", "inference", lambda w: recommend(w, edited_export(
        w, "float-ids", maps=lambda m: {**m, "user_ids": m["user_ids"].astype(float)})), ["1-D integer"]),
    ("recommend: id maps with a user twice", "inference", lambda w: recommend(w, edited_export(
        w, "twice", maps=lambda m: {**m, "user_ids": np.zeros_like(m["user_ids"])})), ["twice"]),
    ("recommend: id maps not a zip", "inference",
     lambda w: recommend(w, edited_export(w, "not-zip", maps=lambda m: b"not a zip")), ["cannot read"]),
    ("recommend: id maps holding a pickle", "inference",
     lambda w: recommend(w, edited_export(w, "pickle", maps=pickle_npz)), ["cannot read"]),
    ("recommend: id maps edited, checksum not", "inference", lambda w: recommend(w, edited_export(
        w, "stale-hash", maps=lambda m: {**m, "train_ptr": m["train_ptr"][:-10]}, hash_updated=False)), ["SHA-256"]),
    ("recommend: id maps of another dataset of the same shape", "inference",
     lambda w: recommend(w, with_file_of(w, "other-maps", (w["export_other"] / "id_maps.npz").read_bytes(),
                                         "id_maps.npz")), ["another dataset"]),
    ("recommend: model file cut short", "inference", lambda w: recommend(w, with_file_of(
        w, "cut-model", (w["export"] / "model.pt2").read_bytes()[:500], "model.pt2")), ["model.pt2", "export again"]),
    ("recommend: model file of another dataset of the same shape", "inference",  # hostile pass M_swaponnx
     lambda w: recommend(w, with_file_of(w, "other-model", (w["export_other"] / "model.pt2").read_bytes(),
                                         "model.pt2")), ["model.pt2", "does not score as the model exported"]),
    ("recommend: id maps with a fingerprint of float ids", "inference", lambda w: recommend(w, edited_export(
        w, "fp-float", maps=lambda m: {**m, "fingerprint_users": m["fingerprint_users"].astype(np.float64)})),
     ["fingerprint"]),
    ("recommend: model file of fewer users", "inference",
     lambda w: recommend(w, with_file_of(w, "small-model", smaller_program(w), "model.pt2")),
     ["model.pt2", "cannot score"]),
    # ---- inference.py recommend --output: recommendations of every user, or of a file's users, into a file
    ("recommend: --all_users without --output", "inference", lambda w: ["recommend", "--model", w["export"],
                                                                       "--all_users"], ["--all_users", "--output"]),
    ("recommend: --users_file without --output", "inference",
     lambda w: ["recommend", "--model", w["export"], "--users_file", users_file(w, "uf-no-out", w["user"])],
     ["--users_file", "--output"]),
    ("recommend: --all_users and --users", "inference", lambda w: everyone(w, "--users", w["user"]), ["not allowed"]),
    ("recommend: --json with --output", "inference", lambda w: everyone(w, "--json"), ["--json", "--output"]),
    ("recommend: --output a user's CSV", "inference", lambda w: everyone(w, output=w["root"] / "mine.csv"),
     ["mine.csv", "not replaced"]),
    ("recommend: --output a user's Parquet file", "inference", lambda w: everyone(w, output=w["root"] / "mine.parquet"),
     ["mine.parquet", "not replaced"]),
    ("recommend: --output beside a user's file of the manifest's name", "inference",
     lambda w: everyone(w, output=users_file(w, "rec-manifest", "mine", "r.csv.manifest.json").with_name("r.csv")),
     ["r.csv.manifest.json", "not replaced"]),
    ("recommend: --output a folder", "inference", lambda w: everyone(w, output=w["root"] / "notes"), ["is a folder"]),
    ("recommend: --output of another format", "inference", lambda w: everyone(w, output=w["root"] / "cases" / "r.txt"),
     [".csv or .parquet"]),
    ("recommend: --output a link to the user's CSV", "inference",
     lambda w: everyone(w, output=link(w, "rec-link", w["root"] / "mine.csv", "r.csv")), ["not replaced"]),
    ("recommend: --output under a file", "inference", lambda w: everyone(w, output=w["root"] / "mine.csv" / "r.csv"),
     ["cannot be created"]),
    ("recommend: --output the --users_file", "inference",
     lambda w: ["recommend", "--model", w["export"], "--users_file", w["root"] / "mine.csv", "--output",
                w["root"] / "mine.csv"], ["not replaced"]),
    ("recommend: --chunk_users 0", "inference", lambda w: everyone(w, "--chunk_users", "0"), ["--chunk_users"]),
    ("recommend: --chunk_users -5", "inference", lambda w: everyone(w, "--chunk_users", "-5"), ["--chunk_users"]),
    ("recommend: --chunk_users a word", "inference", lambda w: everyone(w, "--chunk_users", "all"),
     ["--chunk_users", "invalid int"]),
    ("recommend: --precision amp of an export", "inference", lambda w: everyone(w, "--precision", "amp"),
     ["--precision", "--checkpoint"]),
    ("recommend: --users_file missing", "inference",
     lambda w: everyone(w, users=w["root"] / "cases" / "none.txt"), ["--users_file", "not a file"]),
    ("recommend: --users_file a folder", "inference", lambda w: everyone(w, users=w["root"] / "notes"),
     ["--users_file", "not a file"]),
    ("recommend: --users_file a device", "inference", lambda w: everyone(w, users="/dev/zero"), ["not a file"]),
    ("recommend: --users_file binary", "inference",
     lambda w: everyone(w, users=w["root"] / "mine.png"), ["--users_file", "cannot read"]),
    ("recommend: --users_file with a header", "inference",
     lambda w: everyone(w, users=users_file(w, "uf-header", f"user\n{w['user']}")), ["line 1", "'user'"]),
    ("recommend: --users_file of a float", "inference",
     lambda w: everyone(w, users=users_file(w, "uf-float", f"{w['user']}\n1.5")), ["line 2", "'1.5'"]),
    ("recommend: --users_file empty", "inference", lambda w: everyone(w, users=users_file(w, "uf-empty", "")),
     ["holds no user ids"]),
    ("recommend: --users_file with an unknown user", "inference",
     lambda w: everyone(w, users=users_file(w, "uf-unknown", f"{w['user']}\n999999")), ["--users_file", "999999"]),
    ("recommend: --users_file with an id beyond int64", "inference",
     lambda w: everyone(w, users=users_file(w, "uf-huge", str(2**70))), ["--users_file", str(2**70)[:20]]),
    # ---- inference.py export
    ("export: --output a user's file", "inference", lambda w: ["export", "--checkpoint", w["ck"], "--data",
                                                             w["cache"], "--output", w["root"] / "mine.json"],
     ["not a folder"]),
    ("export: --output a user's folder", "inference", lambda w: ["export", "--checkpoint", w["ck"], "--data",
                                                               w["cache"], "--output", w["root"] / "notes"],
     ["not an export"]),
    ("export: --output the cache", "inference", lambda w: ["export", "--checkpoint", w["ck"], "--data", w["cache"],
                                                         "--output", w["cache"]], ["holds the input --data"]),
    ("export: checkpoint of another dataset of the same shape", "inference",
     lambda w: ["export", "--checkpoint", w["ck_other"], "--data", w["cache"], "--format", "torch-export", "--output",
                w["root"] / "cases" / "never"], ["trained on another dataset"]),
    ("export: --output under a file", "inference", lambda w: ["export", "--checkpoint", w["ck"], "--data", w["cache"],
                                                            "--output", w["root"] / "mine.json" / "x"],
     ["cannot be created"]),
    ("export nvidia: --output a user's file", "inference", lambda w: nvidia_export(w, w["ck"], w["root"] / "mine.json"),
     ["writes a new file only"]),
    ("export nvidia: --output its own --checkpoint", "inference", lambda w: nvidia_export(w, w["ck"], w["ck"]),
     ["writes a new file only"]),
    ("export nvidia: --output a folder", "inference", lambda w: nvidia_export(w, w["ck"], w["root"] / "notes"),
     ["is a folder"]),
    ("export nvidia: checkpoint of another dataset", "inference",
     lambda w: nvidia_export(w, w["ck_other"], w["root"] / "cases" / "never.pth"), ["trained on another dataset"]),
    # ---- inference.py benchmark
    ("benchmark: --users 0", "inference", lambda w: ["benchmark", *QUICK, "--batch_sizes", "8", "--users", "0"],
     ["--users", "got 0"]),
    ("benchmark: --users -5", "inference", lambda w: bench("--users", "-5"), ["--users"]),
    ("benchmark: --items past int32", "inference", lambda w: bench("--items", str(2**31)), ["--items", "int32"]),
    ("benchmark: --batch_sizes 10^13", "inference", lambda w: bench("--batch_sizes", str(10**13)),
     ["--batch_sizes", "GiB", "use batch sizes up to"]),
    ("benchmark: --batch_sizes past int64", "inference", lambda w: bench("--batch_sizes", str(10**30)),
     ["--batch_sizes"]),
    ("benchmark: --batch_sizes 0", "inference", lambda w: bench("--batch_sizes", "8", "0"), ["--batch_sizes"]),
    ("benchmark: --iterations 0", "inference", lambda w: bench("--iterations", "0"), ["--iterations"]),
    ("benchmark: --warmup -1", "inference", lambda w: bench("--warmup", "-1"), ["--warmup"]),
    ("benchmark: --factors 0", "inference", lambda w: bench("--factors", "0"), ["--factors"]),
    ("benchmark: --factors 10^12", "inference", lambda w: bench("--factors", str(10**12)), ["GiB", "smaller shape"]),
    ("benchmark: odd first layer", "inference", lambda w: bench("--layers", "7", "4"), ["--layers"]),
    ("benchmark: --json_path a folder", "inference", lambda w: bench("--json_path", w["root"] / "notes"),
     ["--json_path", "is a folder"]),
    ("benchmark: --json_path a user's JSON", "inference", lambda w: bench("--json_path", w["root"] / "mine.json"),
     ["--json_path", "not replaced"]),
    ("benchmark: --json_path a user's picture", "inference", lambda w: bench("--json_path", w["root"] / "mine.png"),
     ["--json_path", "not replaced"]),
    ("benchmark: --json_path under a file", "inference",
     lambda w: bench("--json_path", w["root"] / "mine.json" / "b.json"), ["cannot be created"]),
    ("benchmark: --json_path the checkpoint", "inference",
     lambda w: ["benchmark", *QUICK, "--batch_sizes", "8", "--checkpoint", w["ck"], "--json_path", w["ck"]],
     ["not replaced"]),
    ("benchmark: --users with --data", "inference",
     lambda w: ["benchmark", *QUICK, "--data", w["cache"], "--users", "5"], ["--users", "--data"]),
    ("benchmark: --factors with --checkpoint", "inference",
     lambda w: ["benchmark", *QUICK, "--checkpoint", w["ck"], "--factors", "5"], ["--factors", "--checkpoint"]),
    ("benchmark: checkpoint of another dataset", "inference",
     lambda w: ["benchmark", *QUICK, "--data", w["cache"], "--checkpoint", w["ck_other"]],
     ["trained on another dataset"]),
    # ---- benchmarks/batch_recommend_benchmark.py
    ("batch_recommend_benchmark: --users_timed 0", "batch_recommend_benchmark",
     lambda w: tiny_batch("--users_timed", 0), ["--users_timed"]),
    ("batch_recommend_benchmark: --users_timed past the users", "batch_recommend_benchmark",
     lambda w: tiny_batch("--users_timed", 301), ["--users_timed", "more than the 300 users"]),
    ("batch_recommend_benchmark: --users_timed a word", "batch_recommend_benchmark",
     lambda w: tiny_batch("--users_timed", "all"), ["--users_timed", "invalid int"]),
    ("batch_recommend_benchmark: --chunk_users 0", "batch_recommend_benchmark",
     lambda w: tiny_batch("--chunk_users", 0), ["--chunk_users"]),
    ("batch_recommend_benchmark: --topk -1", "batch_recommend_benchmark", lambda w: tiny_batch("-k", -1), ["--topk"]),
    ("batch_recommend_benchmark: --users past int32", "batch_recommend_benchmark",
     lambda w: tiny_batch("--users", 2**31), ["--users", "int32"]),
    ("batch_recommend_benchmark: --positives -1", "batch_recommend_benchmark", lambda w: tiny_batch("--positives", -1),
     ["--positives"]),
    ("batch_recommend_benchmark: more positives than pairs", "batch_recommend_benchmark",
     lambda w: tiny_batch("--positives", 300 * 200 + 1), ["--positives"]),
    ("batch_recommend_benchmark: a shape past memory", "batch_recommend_benchmark",
     lambda w: tiny_batch("--users", 2**31 - 1, "--items", 2**31 - 1, "--users_timed", 5), ["GiB", "smaller shape"]),
    ("batch_recommend_benchmark: --device cuda without one", "batch_recommend_benchmark",
     lambda w: tiny_batch("--device", "cuda") if not torch.cuda.is_available() else tiny_batch("-k", 0), ["--"]),
    # ---- benchmarks/stability.py
    ("stability: --first_seed -1", "stability", lambda w: stab(w, "--first_seed", "-1"), ["--first_seed"]),
    ("stability: seeds past 2^32", "stability", lambda w: stab(w, "--first_seed", str(2**32 - 1), "--seeds", "2"),
     ["--first_seed", "--seeds"]),
    ("stability: --seeds 0", "stability", lambda w: stab(w, "--seeds", "0"), ["--seeds"]),
    ("stability: --jobs 0", "stability", lambda w: stab(w, "--jobs", "0"), ["--jobs"]),
    ("stability: --data not a cache", "stability",
     lambda w: ["--data", w["root"] / "notes", "--output", w["root"] / "cases" / "stab-new"], ["not a dataset cache"]),
    ("stability: ncf.py's own check after --", "stability", lambda w: stab(w, "--", "-e", "0"),
     ["after --", "--epochs"]),
    ("stability: unknown flag after --", "stability", lambda w: stab(w, "--", "--bogus"), ["after --", "--bogus"]),
    ("stability: a word where a number goes after --", "stability", lambda w: stab(w, "--", "-e", "x"),
     ["after --", "invalid int"]),
    ("stability: --output a user's file", "stability", lambda w: stab(w, output=w["root"] / "mine.json"),
     ["not a folder"]),
    ("stability: --output a user's folder", "stability", lambda w: stab(w, output=w["root"] / "notes"),
     ["did not write"]),
    ("stability: --output holds --data", "stability", lambda w: stab(w, output=w["root"] / "a"),
     ["holds the --data"]),
    ("stability: a seed log that is no log", "stability",
     lambda w: stab(w, output=stability_output(w, "stab-log", {"seed_1.json": b"my notes\n"})),
     ["seed_1.json", "not replaced"]),
    ("stability: a seed output it did not start", "stability",
     lambda w: stab(w, output=stability_output(w, "stab-out", {"seed_1.out": b"my notes\n"})),
     ["seed_1.out", "not replaced"]),
    ("stability: a histogram it did not draw", "stability",
     lambda w: stab(w, output=stability_output(w, "stab-png", {"stability_hr.png": PNG + b"mine"})),
     ["stability_hr.png", "not replaced"]),
    ("stability: a seed folder that is a file", "stability",
     lambda w: stab(w, output=stability_output(w, "stab-dir", {"seed_1": b"mine"})), ["seed_1", "not a folder"]),
    # ---- benchmarks/throughput.py
    ("throughput: --json_out a user's file", "throughput",
     lambda w: [*TINY_THROUGHPUT, "--json_out", w["root"] / "mine.json"], ["--json_out", "not replaced"]),
    ("throughput: --json_out with a line not of ours", "throughput",
     lambda w: [*TINY_THROUGHPUT, "--json_out", throughput_log_with_a_foreign_line(w)], ["--json_out"]),
    ("throughput: --json_out a folder", "throughput", lambda w: [*TINY_THROUGHPUT, "--json_out", w["root"] / "notes"],
     ["--json_out", "is a folder"]),
    ("throughput: --steps 0", "throughput", lambda w: [*TINY_THROUGHPUT, "--steps", "0"], ["--steps"]),
    ("throughput: --warmup -1", "throughput", lambda w: [*TINY_THROUGHPUT, "--warmup", "-1"], ["--warmup"]),
    ("throughput: a batch larger than the epoch", "throughput", lambda w: [*TINY_THROUGHPUT, "--batch_size", "99999"],
     ["--batch_size", "none to time"]),
    ("throughput: --positives 10^13", "throughput", lambda w: [*TINY_THROUGHPUT, "--positives", str(10**13)],
     ["GiB", "--positives"]),
    ("throughput: --dropout nan", "throughput", lambda w: [*TINY_THROUGHPUT, "--dropout", "nan"], ["--dropout"]),
    ("throughput: --users past int32", "throughput", lambda w: [*TINY_THROUGHPUT, "--users", str(2**31)],
     ["--users"]),
    ("throughput: odd first layer", "throughput", lambda w: [*TINY_THROUGHPUT, "--layers", "7", "4"], ["--layers"]),
    ("throughput: batch not divisible", "throughput", lambda w: [*TINY_THROUGHPUT, "--grads_accumulated", "3"],
     ["--grads_accumulated"]),
    ("throughput: --threads 0", "throughput", lambda w: [*TINY_THROUGHPUT, "--threads", "0"], ["--threads"]),
    ("throughput: --profile -1", "throughput", lambda w: [*TINY_THROUGHPUT, "--profile", "-1"], ["--profile"]),
    ("throughput: --device cuda without one", "throughput",
     lambda w: [*TINY_THROUGHPUT, "--device", "cuda"] if not torch.cuda.is_available() else ["--steps", "0"],
     ["--"]),
    # ---- benchmarks/convert_benchmark.py
    ("convert_benchmark: --negatives 0", "convert_benchmark",
     lambda w: ["--workdir", w["root"] / "cases" / "cb-new", "--negatives", "0"], ["--negatives"]),
    ("convert_benchmark: --workdir a file", "convert_benchmark", lambda w: ["--workdir", w["root"] / "mine.json"],
     ["--workdir", "not a folder"]),
    ("convert_benchmark: a ratings.csv of the user's", "convert_benchmark",
     lambda w: workdir_with(w, "cb-ratings", {"ratings.csv": b"userId,movieId,rating,timestamp\n"}),
     ["ratings.csv", "neither used nor replaced"]),
    ("convert_benchmark: its ratings.csv, edited since", "convert_benchmark", our_ratings_edited,
     ["ratings.csv", "neither used nor replaced"]),
    ("convert_benchmark: a cache folder of the user's", "convert_benchmark", foreign_cache_folder,
     ["cache", "neither replaced nor removed"]),
    # ---- benchmarks/planted_ceiling.py and sync_check.py
    ("planted_ceiling: --topk 0", "planted_ceiling", lambda w: ["--cache", w["cache"], "--users", "300", "--items",
                                                              "200", "--interactions_per_user_mean", "30", "--topk",
                                                              "0"], ["--topk"]),
    ("planted_ceiling: --users 10^12", "planted_ceiling",
     lambda w: ["--cache", w["cache"], "--users", str(10**12), "--items", "200", "--interactions_per_user_mean", "30"],
     ["--cache", "users"]),
    ("planted_ceiling: --cache not a cache", "planted_ceiling", lambda w: ["--cache", w["root"] / "notes"],
     ["notes"]),
    ("sync_check: --batch_size 0", "sync_check", lambda w: ["--data", w["cache"], "--batch_size", "0"],
     ["--batch_size"]),
    ("sync_check: fewer steps an epoch than it checks", "sync_check",
     lambda w: ["--data", w["cache"], "--device", "cpu", "--batch_size", "1000000"], ["--batch_size", "smaller"]),
    ("sync_check: --data not a cache", "sync_check",
     lambda w: ["--data", w["root"] / "notes", "--device", "cpu"], ["notes"]),
    # ---- python -m logger.plot
    ("plot: a folder as the log", "plot", lambda w: [w["root"] / "notes", "-o", w["root"] / "cases" / "p.png"],
     ["is a folder"]),
    ("plot: a device as the log", "plot", lambda w: ["/dev/zero", "-o", w["root"] / "cases" / "p.png"],
     ["not a regular file"]),
    ("plot: -o a picture of the user's", "plot", lambda w: [w["root"] / "log.json", "-o", w["root"] / "mine.png"],
     ["mine.png", "not replaced"]),
    ("plot: -o a pdf of the user's", "plot", lambda w: [w["root"] / "log.json", "-o", w["root"] / "mine.pdf"],
     ["mine.pdf", "not replaced"]),
    ("plot: -o a link to the user's picture", "plot",
     lambda w: [w["root"] / "log.json", "-o", link(w, "plot-link", w["root"] / "mine.png", "p.png")], ["not replaced"]),
    ("plot: figures no axis can hold", "plot", lambda w: [huge_figures(w), "-o", w["root"] / "cases" / "p.png"],
     ["cannot draw"]),
    # ---- added by the hostile pass
    ("plot: epochs without figures", "plot", lambda w: [figureless(w), "-o", w["root"] / "cases" / "p.png"],
     ["no figure to draw"]),
    ("benchmark: a batch size twice", "inference", lambda w: bench("--batch_sizes", "8", "8"),
     ["--batch_sizes", "twice"]),
    ("planted_ceiling: --cache missing", "planted_ceiling",
     lambda w: ["--cache", w["root"] / "none", "--users", "300", "--items", "200"], ["pass --cache"]),
    ("benchmark: --json_path a link to the user's file", "inference",
     lambda w: bench("--json_path", link(w, "bench-link", w["root"] / "mine.json", "b.json")), ["not replaced"]),
    ("stability: another run holds the output", "stability", lambda w: stab(w, output=held_output(w)),
     ["in use by another run"]),
    ("stability: a lock file not of ours", "stability",
     lambda w: stab(w, output=stability_output(w, "stab-lock", {".lock": b"my notes\nmore\n"})),
     ["not taken as a lock"]),
]


def link(w, name, target, link_name):
    path = case_dir(w, name) / link_name
    path.symlink_to(target)
    return path


def figureless(w):
    path = case_dir(w, "figureless") / "log.json"
    path.write_text("".join(json.dumps({"event": "epoch", "epoch": e}) + "\n" for e in (1, 2)))
    return path


def huge_figures(w):
    path = case_dir(w, "huge-figures") / "log.json"
    path.write_text("".join(json.dumps({"event": "epoch", "epoch": e, "loss": 0.5, "hr": 1e308, "ndcg": 0.1}) + "\n"
                            for e in (1, 2)))
    return path


def held_output(w):
    """A stability output that another (here: this) process is writing: its lock is held."""
    from cli import LOCK_FILE, hold_lock

    folder = stability_output(w, "stab-held", {})
    w["held lock"] = hold_lock(str(folder / LOCK_FILE), f"--output {folder}")
    return folder


def tree(root):
    """Every file (with its SHA-256) and folder under `root`: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def run_main(capsys, command, argv):
    """(exit status, stderr lines) of MAIN(argv) in-process; Ctrl-C must not escape as an exception."""
    try:
        MAINS[command]([str(a) for a in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, err.strip().splitlines(), out


@pytest.mark.parametrize("case, command, argv, words", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(workspace, capsys, case, command, argv, words):
    args = argv(workspace)
    before = tree(workspace["root"])
    status, lines, _ = run_main(capsys, command, args)
    assert status == 2, (status, lines)
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert tree(workspace["root"]) == before


# ---- Ctrl-C: exit status 130, one line, nothing half-written, the user's files unchanged ------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def partial_then_interrupt(model, path):
    with open(path, "wb") as f:  # half a model, as an exporter stopped mid-write leaves it
        f.write(b"half a model")
    raise KeyboardInterrupt


def interrupted_cases(w, monkeypatch, case):
    """(command, argv) of each interruption, with the interruption planted."""
    folder = case_dir(w, f"ctrl-c-{case}")
    if case == "export":
        shutil.copytree(w["export"], folder / "export")
        monkeypatch.setitem(export.EXPORTERS, "torch-export", partial_then_interrupt)
        return "inference", ["export", "--checkpoint", w["ck"], "--data", w["cache"], "--format", "torch-export",
                             "--output", folder / "export"]
    if case == "benchmark":
        monkeypatch.setattr(inference_benchmark, "time_calls", interrupt)
        return "inference", bench("--json_path", folder / "bench.json")
    if case in ("recommend-csv", "recommend-parquet"):  # a file of ours in place, stopped after a chunk
        argv = everyone(w, "--chunk_users", "50", output=folder / f"recs.{case.split('-')[1]}")
        MAINS["inference"]([str(a) for a in argv])
        calls = []

        def ranked_then_interrupt(*args):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_ranked(*args)

        real_ranked = serving.ranked
        monkeypatch.setattr(serving, "ranked", ranked_then_interrupt)
        return "inference", argv
    if case == "plot":
        import matplotlib.figure

        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupt)
        return "plot", [w["root"] / "log.json", "-o", folder / "p.png"]
    if case == "throughput":
        monkeypatch.setattr(throughput, "run_child", interrupt)
        return "throughput", [*TINY_THROUGHPUT, "--json_out", folder / "t.jsonl"]
    monkeypatch.setattr(stability, "train_seed", interrupt)
    return "stability", ["--data", w["cache"], "--output", folder / "runs", "--", *TINY_MODEL]


@pytest.mark.parametrize("case", ["export", "benchmark", "recommend-csv", "recommend-parquet", "plot", "throughput",
                                  "stability"])
def test_ctrl_c_is_one_line_and_leaves_nothing_half_written(workspace, capsys, monkeypatch, case):
    command, argv = interrupted_cases(workspace, monkeypatch, case)
    before = tree(workspace["root"])
    status, lines, _ = run_main(capsys, command, argv)
    assert status == 130 and len(lines) == 1 and lines[0].endswith("interrupted"), (status, lines)
    after = tree(workspace["root"])
    assert not [name for name in after if ".tmp-" in name or ".old-" in name]
    if case == "stability":  # its own folder stays, and says the study did not finish
        runs = workspace["root"] / "cases" / "ctrl-c-stability" / "runs"
        assert json.loads((runs / "stability.json").read_text())["complete"] is False
        after = {k: v for k, v in after.items() if "runs" not in k}
        before = {k: v for k, v in before.items() if "runs" not in k}
    assert after == before


# ---- each fix, with the case that showed the bug ---------------------------------------------------------------


def test_benchmark_users_zero_is_not_the_default_model(capsys, monkeypatch):
    """`--users 0` built ml-20m's 138,493-user model: 0 was taken for "not given"."""
    built = []
    monkeypatch.setattr(inference_benchmark, "check_memory", lambda config, *rest: built.append(config))
    status, lines, _ = run_main(capsys, "inference", ["benchmark", *QUICK, "--batch_sizes", "8", "--users", "0"])
    assert status == 2 and "--users" in lines[0] and not built


def test_batch_sizes_beyond_memory_are_refused_before_the_model_is_built(capsys, monkeypatch):
    monkeypatch.setattr(devices, "memory_bytes", lambda device, free=True: 2**16)
    monkeypatch.setattr(inference_benchmark, "time_calls", lambda *a: pytest.fail("the benchmark started"))
    status, lines, _ = run_main(capsys, "inference", bench("--batch_sizes", "8", "4096"))
    assert status == 2 and "--batch_sizes 4,096" in lines[0], lines
    fixed, per_sample = inference_benchmark.memory_needs({"nb_users": 10, "nb_items": 10, "mf_dim": 4,
                                                "mlp_layer_sizes": [8, 4]}, onnx=False)
    # 20 rows x (4 + 4) + the layer 8x4 + 4 + the output 4 + 4 + 1 parameters; 20 rows x 4 first-layer terms.
    assert fixed == 4 * (20 * 8 + 36 + 9) + 4 * 20 * 4
    assert per_sample == 4 * (2 * 8 + 4 + 12 + 1) + 16
    assert f"up to {(2**16 - fixed) // per_sample:,}" in lines[0]


def test_json_path_is_checked_before_the_benchmark_and_only_ours_is_replaced(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(inference_benchmark, "benchmark_model", lambda *a: pytest.fail("the benchmark started"))
    status, lines, _ = run_main(capsys, "inference", bench("--json_path", tmp_path))
    assert status == 2 and "is a folder" in lines[0]
    monkeypatch.undo()
    report = tmp_path / "bench.json"
    for _ in range(2):  # the second run replaces the report the first one wrote
        status, lines, out = run_main(capsys, "inference", bench("--json_path", report))
        assert status == 0, lines
        written = json.loads(report.read_text())
        assert written.pop("created_by") == inference_benchmark.CREATED_BY
        assert written == json.loads(out.strip().splitlines()[-1])


def test_export_id_maps_carry_the_manifests_dataset(workspace):
    manifest = json.loads((workspace["export"] / "manifest.json").read_text())
    with np.load(workspace["export"] / "id_maps.npz", allow_pickle=False) as maps:
        identity = maps["dataset"]
    carried = json.loads(str(identity))
    assert carried == manifest["dataset"] == torch.load(workspace["ck"], weights_only=True)["dataset"]
    assert serving.identity_problem({"dataset": identity}, manifest) is None
    other = json.loads((workspace["export_other"] / "manifest.json").read_text())
    assert "another dataset" in serving.identity_problem({"dataset": np.array(json.dumps(carried))}, other)


def test_throughput_appends_only_to_its_own_log(capsys, monkeypatch, tmp_path):
    records = iter([{"batch_size": 1024, "n": 1}, {"batch_size": 1024, "n": 2}])
    monkeypatch.setattr(throughput, "run_child", lambda *a: next(records))
    monkeypatch.setattr(throughput, "print_table", lambda *a: None)
    log = tmp_path / "t.jsonl"
    for _ in range(2):
        status, lines, _ = run_main(capsys, "throughput", [*TINY_THROUGHPUT, "--json_out", log])
        assert status == 0, lines
    written = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["created_by"], r["n"]) for r in written] == [(throughput.CREATED_BY, 1), (throughput.CREATED_BY, 2)]
    assert throughput.is_throughput_log(log)


def test_a_failing_throughput_child_is_one_line(capsys, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\n ...\nRuntimeError: boom\n")

    monkeypatch.setattr(throughput.subprocess, "run", failing)
    status, lines, _ = run_main(capsys, "throughput", TINY_THROUGHPUT)
    assert status == 1 and len(lines) == 1 and "RuntimeError: boom" in lines[0], lines


def test_convert_benchmark_removes_only_a_cache_of_convert(workspace, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(workspace["cache"], cache)
    (cache / "notes.txt").write_text("mine")
    convert_benchmark.remove_cache(str(cache))
    assert (cache / "notes.txt").read_text() == "mine" and (cache / "metadata.json").is_file()
    (cache / "notes.txt").unlink()
    convert_benchmark.remove_cache(str(cache))
    assert not cache.exists()


def test_plot_replaces_its_own_plot_only(tmp_path, capsys):
    (tmp_path / "log.json").write_text(log_lines())
    output = tmp_path / "p.png"
    for _ in range(2):
        status, lines, _ = run_main(capsys, "plot", [tmp_path / "log.json", "-o", output])
        assert status == 0, lines
    assert plot.plot_of(plot.CREATED_BY)(str(output))
    output.write_bytes(PNG + b"now a picture of mine")
    status, lines, _ = run_main(capsys, "plot", [tmp_path / "log.json", "-o", output])
    assert status == 2 and "not replaced" in lines[0]
    assert output.read_bytes() == PNG + b"now a picture of mine"


def test_plot_leaves_out_nan_and_infinite_figures(tmp_path, capsys):
    """A diverged epoch logs a NaN or infinite loss: the rest is drawn, and the plot says what it left out."""
    lines = [{"event": "epoch", "epoch": e, "loss": loss, "hr": 0.4, "ndcg": 0.2}
             for e, loss in ((1, 0.5), (2, float("inf")), (3, float("nan")))]
    (tmp_path / "log.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    status, _, out = run_main(capsys, "plot", [tmp_path / "log.json", "-o", tmp_path / "p.png"])
    assert status == 0 and "note: 2 logged figure(s) are NaN or infinite" in out
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)


def test_these_files_pass_ruff():
    ruff = ROOT / ".venv" / "bin" / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in .venv")
    files = ["inference.py", "serving.py", "recommendation_files.py", "export.py", "logger/plot.py",
             *(f"benchmarks/{name}.py" for name in ("stability", "throughput", "convert_benchmark", "planted_ceiling",
                                                    "sync_check", "inference_benchmark", "batch_recommend_benchmark"))]
    result = subprocess.run([str(ruff), "check", *files], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


# ---- end to end: the real command lines, with training ---------------------------------------------------------


@pytest.mark.slow
def test_stability_rerun_keeps_what_the_user_put_in_its_output(workspace, tmp_path, run_cli):
    output = tmp_path / "runs"
    argv = ["benchmarks/stability.py", "--data", workspace["cache"], "--seeds", 1, "--output", output, "--", "-e", 1,
            *TINY_MODEL]
    first = run_cli(argv)
    assert first.returncode == 0, first.stderr
    (output / "seed_1" / "notes.txt").write_text("mine")
    second = run_cli(argv)
    assert second.returncode == 0, second.stderr
    assert (output / "seed_1" / "notes.txt").read_text() == "mine"
    assert (output / "seed_1.out").read_text().startswith(stability.OUT_HEADER + "1\n")
    assert sum(r["event"] == "config" for r in map(json.loads, (output / "seed_1.json").read_text().splitlines())) == 1
    assert plot.plot_of(stability.CREATED_BY)(str(output / "stability_hr.png"))


@pytest.mark.slow
def test_convert_benchmark_end_to_end_keeps_its_ratings_and_removes_its_cache(tmp_path, run_cli):
    argv = ["benchmarks/convert_benchmark.py", "--preset", "default", "--workdir", tmp_path, "--negatives", 10]
    for _ in range(2):
        result = run_cli(argv)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[0])["num_users"] == 6000
    assert sorted(os.listdir(tmp_path / "default")) == ["ratings.csv", "ratings.json"]
    assert "reusing" in result.stderr
