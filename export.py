"""Export of a trained model for serving, and a checkpoint as a source of recommendations: the torch side.

    python inference.py export --checkpoint data/checkpoints/model.pth --data data/cache/ml-20m \
        --format onnx --output data/export/ml-20m

`export` writes the scoring model (ONNX, or a torch.export program), the id maps and a manifest, the folder
`recommend --model` serves (serving.py reads it, without torch). `--format onnx` needs the extras of
requirements-export.txt. `--format nvidia` writes one file instead, NVIDIA's recipe model.pth, so that a model
moves back to the recipe. `recommend --checkpoint` scores through `checkpoint_source` here.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before torch starts its thread pool)

import contextlib
import json
import logging
import os
import warnings

import numpy as np
import torch

import cache_format
import checkpoint
from cache_format import file_record
from cli import NEW_FILES_ONLY, EnvironmentFailure, UserError, check_output_folder, check_output_path, is_own_folder, \
    json_marker, main_guard, may_write, owned_file, staged_folder
from dataloading import load_cache, train_positives_csr
from devices import choose_precision, pick_device
from serving import (EXPORT_CREATED_BY, EXPORT_FILES, EXPORT_VERSION, ID_MAPS_FILE, INPUTS, MANIFEST_FILE,
                     MODEL_FILES, OUTPUT, Source, ort_session, program_scorer, read_manifest, require,
                     session_scorer)

CHECK_PAIRS = 4096  # random (user, item) pairs on which an export must score as the checkpoint does
TOLERANCE = 1e-5  # fp32 logits, absolute and relative
# Pairs a checkpoint scores per call: each call also computes the first MLP layer's term of every item
# (neumf.score_candidates), a cost that calls of ~2^20 pairs make small; on a CPU the activations are
# per user whatever the call (cpu_kernels.mlp_scores_in_place).
TORCH_PAIRS_PER_CALL = 2**20


# ---------------------------------------------------------------------------------------------
# A checkpoint as scorer and as source of recommendations.


def load_model(path, cache, device):
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path} does not exist: pass the model.pth that ncf.py wrote")
    return checkpoint.load_model(path, cache, device, "--checkpoint")


def id_maps(cache):
    """What ranking needs of a dataset cache, as numpy arrays (see serving.py's Ranking section)."""
    return {"user_ids": cache.user_ids.numpy().astype(np.int64), "item_ids": cache.item_ids.numpy().astype(np.int64),
            "train_ptr": train_positives_csr(cache.train, cache.num_users).numpy(),
            "train_items": cache.train[:, 1].numpy().astype(np.int32)}


def model_scorer(model, device):
    """Pair scorer (users [B], items [B]) -> logits [B] of the model's forward: what an export must equal."""
    def score(users, items):
        with torch.no_grad():
            logits = model(torch.from_numpy(users).to(device), torch.from_numpy(items).to(device))
            return logits.float().cpu().numpy()

    return score


def users_scorer(model, device, precision):
    """score_users (dense users [n]) -> logits [n, items]: every item of each user, through the model's
    evaluation path (neumf.score_candidates: the first layer's terms once per user and per item)."""
    items = torch.arange(model.nb_items, device=device)

    def score_users(users):
        users = torch.from_numpy(users.astype(np.int64)).to(device)
        with torch.inference_mode(), precision.autocast():
            return model.score_candidates(users, items.expand(len(users), -1)).float().cpu().numpy()

    return score_users


def amp_precision(device):
    """fp16 autocast on CUDA (the recipe's), bf16 autocast on CPU (torch has no fp16 CPU autocast path)."""
    return choose_precision("O2", "float16" if device.type == "cuda" else "bfloat16", device)


def checkpoint_source(data, path, device_flag, precision_flag):
    """serving.Source of a checkpoint and the cache it was trained on."""
    cache = load_cache(data)
    device = pick_device(device_flag)
    model, ckpt = load_model(path, cache, device)
    precision = amp_precision(device) if precision_flag == "amp" else choose_precision("O0", "auto", device)
    facts = {**checkpoint_facts(ckpt, path, cache), "data": os.path.abspath(data), "precision": precision.name}
    return Source(id_maps(cache), users_scorer(model.eval(), device, precision),
                  max(1, TORCH_PAIRS_PER_CALL // cache.num_items), facts)


def checkpoint_facts(ckpt, path, cache):
    """What a manifest says of the checkpoint, as plain JSON: a checkpoint's optional fields may be edited."""
    def plain(value, kind):
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    # The identity load_model compared with the cache's (through cli.identity_mismatch); a checkpoint that
    # records none (NVIDIA's, or older than identities) gets the cache's, and the manifest says it was not checked.
    dataset = ckpt.get("dataset") if isinstance(ckpt.get("dataset"), dict) else None
    return {"dataset": dataset or cache_format.dataset_identity(cache.metadata), "dataset_checked": dataset is not None,
            "checkpoint": {"path": os.path.abspath(path), "epoch": plain(ckpt.get("epoch"), int),
                           "topk": plain(saved_args.get("topk", 10), int), "hr": plain(ckpt.get("hr"), (int, float)),
                           "ndcg": plain(ckpt.get("ndcg"), (int, float))}}


# ---------------------------------------------------------------------------------------------
# Export


def is_export_folder(folder):
    """True iff `export` may replace `folder`: it is empty, or provably an export this command wrote
    (manifest.json says so, and it holds nothing but regular files named as an export's)."""
    return is_own_folder(folder, EXPORT_FILES, read_manifest, EXPORT_CREATED_BY)


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
    # Two pairs, not one: torch.export would take a batch of 1 for a constant, not a dynamic size. Two
    # tensors, not one twice: the tracer would take the item input for the user input.
    device = model.user_embed.weight.device
    return torch.zeros(2, dtype=torch.long, device=device), torch.zeros(2, dtype=torch.long, device=device)


def dynamic_batch():
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


def fingerprint(reference, num_users, num_items):
    """The logits of a few fixed pairs, kept in the id maps: a model file swapped in from another export of the
    same shape (its checksum updated in the manifest) scores them otherwise, and serving refuses it."""
    users = np.array([0, num_users // 2, num_users - 1, 0], dtype=np.int64)
    items = np.array([0, num_items // 2, num_items - 1, num_items - 1], dtype=np.int64)
    return {"fingerprint_users": users, "fingerprint_items": items,
            "fingerprint_logits": np.asarray(reference(users, items), dtype=np.float32)}


def export_manifest(args, tmp, cache, ckpt, known, facts, check):
    """manifest.json's content: the format, inputs and output, model, data, versions, check and files."""
    return {
        "created_by": EXPORT_CREATED_BY, "export_version": EXPORT_VERSION, "format": args.format,
        "model_file": MODEL_FILES[args.format],
        "inputs": {name: {"dtype": "int64", "shape": ["batch"], "range": [0, count - 1]}
                   for name, count in zip(INPUTS, (cache.num_users, cache.num_items), strict=True)},
        "output": {OUTPUT: {"dtype": "float32", "shape": ["batch"], "meaning": "logit; sigmoid gives the "
                                                                                "probability"}},
        "model": ckpt["config"], **known, "torch": torch.__version__, **facts, "check": check,
        "files": {name: file_record(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
    }


def run_nvidia_export(args):
    """NVIDIA's model.pth (a plain state dict of its NeuMF) at --output, a new file, read back through the
    recipe-format loader and checked to score as the checkpoint does."""
    check_output_path(args.output, "--output")
    if os.path.lexists(args.output) and not may_write(args.output, NEW_FILES_ONLY):
        raise UserError(f"--output {args.output} exists, and --format nvidia writes a new file only (a plain state "
                        "dict carries no mark of who wrote it, so nothing shows it may be replaced): choose a new "
                        "path, or move that file away")
    cache = load_cache(args.data)
    model, ckpt = load_model(args.checkpoint, cache, torch.device("cpu"))
    checkpoint.save_atomic(checkpoint.to_nvidia(ckpt), args.output)
    with warnings.catch_warnings():  # that it records no dataset: the recipe's format has no place for one
        warnings.simplefilter("ignore")
        back, _ = checkpoint.load_model(args.output, cache, torch.device("cpu"), "--output")
    max_diff = check_export(model_scorer(model, torch.device("cpu")), model_scorer(back, torch.device("cpu")),
                            cache.num_users, cache.num_items)
    print(f"exported {args.checkpoint} in NVIDIA's recipe format to {args.output} (load it with its "
          f"NeuMF.load_state_dict); logits equal the checkpoint's to {max_diff:.1e} on {CHECK_PAIRS:,} random pairs")


def run_export(args):
    if args.format == "nvidia":
        return run_nvidia_export(args)
    check_export_output(args.output, {"--checkpoint": args.checkpoint, "--data": args.data})
    # The extras are checked before any work, as the output path is.
    ort = require("export --format onnx", "onnx", "onnxscript", "onnxruntime")[-1] if args.format == "onnx" else None
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
            np.savez(f, **id_maps(cache), dataset=np.array(json.dumps(known["dataset"], sort_keys=True)),
                     **fingerprint(reference, cache.num_users, cache.num_items))
        check = {"pairs": CHECK_PAIRS, "max_abs_logit_diff": max_diff, "tolerance": TOLERANCE, "runtime": runtime}
        manifest = export_manifest(args, tmp, cache, ckpt, known, facts, check)
        with owned_file(os.path.join(tmp, MANIFEST_FILE), "--output", json_marker(EXPORT_CREATED_BY),
                        "a manifest") as f:
            f.write(json.dumps(manifest, indent=1).encode())
    print(f"exported {args.checkpoint} ({args.format}) to {args.output}: {', '.join(manifest['files'])}, "
          f"{MANIFEST_FILE}; logits equal the checkpoint's to {max_diff:.1e} on {CHECK_PAIRS:,} random pairs")


def parse_args(argv=None, prog=None):
    parser = cli.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="model.pth written by ncf.py")
    parser.add_argument("--data", required=True, help="dataset cache the checkpoint was trained on (its id maps and "
                                                      "training items go into the export)")
    parser.add_argument("--format", choices=(*MODEL_FILES, "nvidia"), default="onnx",
                        help="onnx: served by onnxruntime; torch-export: a torch.export program (.pt2); nvidia: "
                             "NVIDIA's recipe model.pth (a plain state dict of its NeuMF), for its ncf.py --mode test "
                             "or load_state_dict")
    parser.add_argument("--output", required=True, help="folder to write (an existing one is replaced only if it "
                                                        "is empty or an export of this command); with --format nvidia, "
                                                        "a new file")
    return parser.parse_args(argv)


@main_guard
def main(argv=None, prog=None):
    run_export(parse_args(argv, prog))
