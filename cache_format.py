"""The dataset cache's layout, shared by its writer (convert.py) and its reader (dataloading.py).

No torch or pandas here: `convert.py --check` and the shell scripts stay instant.

metadata.json records each tensor file's size and SHA-256 (under "files"), so a file that was
truncated, edited or swapped with another dataset's is refused. A folder is taken for a cache of ours,
which convert.py may replace, only if metadata.json says convert.py wrote it and the folder holds
nothing but the cache's files.
"""
import hashlib
import json
import os

FORMAT_VERSION = 2  # 2: metadata.json records each tensor file's size and SHA-256
METADATA_FILE = "metadata.json"  # written last: a cache without it is incomplete
# The cache's tensors: the name each is known by in code (dataloading.Cache's fields) -> its file.
FILE_OF = {"train": "train_ratings.pt", "test": "test_ratings.pt", "test_negatives": "test_negatives.pt",
           "user_ids": "user_ids.pt", "item_ids": "item_ids.pt",
           # Written only by `convert.py --validation` (metadata "validation": true): each user's held-out
           # second-to-last item (-1 for a user with too few items to spare one) and its negatives.
           "valid": "valid_ratings.pt", "valid_negatives": "valid_negatives.pt"}
VALIDATION_FIELDS = ("valid", "valid_negatives")
TENSOR_FILES = tuple(file for field, file in FILE_OF.items() if field not in VALIDATION_FIELDS)
VALIDATION_FILES = tuple(FILE_OF[field] for field in VALIDATION_FIELDS)
CACHE_FILES = (*TENSOR_FILES, *VALIDATION_FILES, METADATA_FILE)
CREATED_BY = "convert.py"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tensor_files(metadata):
    """The tensor files a cache with this metadata holds."""
    return (*TENSOR_FILES, *VALIDATION_FILES) if metadata.get("validation") is True else TENSOR_FILES


def file_record(path):
    """What metadata.json records of one tensor file."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}


def read_metadata(folder):
    """metadata.json of `folder` as a dict; raises ValueError (with the reason) or OSError."""
    with open(os.path.join(folder, METADATA_FILE), encoding="utf-8") as f:
        try:
            metadata = json.load(f)
        except RecursionError:
            raise ValueError("nested too deeply") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"it holds a JSON {type(metadata).__name__}, not an object")
    return metadata


def files_problem(folder, metadata):
    """Why the tensor files of `folder` are not the ones metadata.json records, or None if they are.

    Sizes are compared first, so a truncated file costs nothing to find; then the SHA-256 of each file.
    """
    records = metadata.get("files")
    if not isinstance(records, dict):
        return f"{METADATA_FILE} lacks the checksums of the tensor files"
    for name in tensor_files(metadata):
        record = records.get(name)
        if not isinstance(record, dict):
            return f"{METADATA_FILE} lacks the checksum of {name}"
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != record.get("bytes"):
            return f"{name} has {os.path.getsize(path)} bytes, not the {record.get('bytes')} {METADATA_FILE} records"
    for name in tensor_files(metadata):
        if sha256_of(os.path.join(folder, name)) != records[name].get("sha256"):
            return (f"{name} does not match the SHA-256 {METADATA_FILE} records "
                    "(changed, or swapped with another cache's, since convert.py wrote it)")
    return None


def dataset_identity(metadata):
    """What identifies the data a model was trained on, as checkpoints, exports and studies record it:
    the counts, the source file's checksum and convert settings, whether the cache holds a validation
    split, and the checksum of the training pairs themselves (which items were held out). A model trained
    without the validation split trained on the validation items: its validation HR would be inflated."""
    return {"num_users": metadata.get("num_users"), "num_items": metadata.get("num_items"),
            "source_sha256": metadata.get("source_sha256"), "min_ratings": metadata.get("min_ratings"),
            "validation": metadata.get("validation") is True, "train_sha256": _file_sha256(metadata, TENSOR_FILES[0])}


def evaluation_identity(metadata):
    """dataset_identity and the checksums of the held-out items and their negatives: two caches with the
    same identity here give the same figures for the same model (what a tuning study compares)."""
    held_out = {name: _file_sha256(metadata, name) for name in tensor_files(metadata) if name != TENSOR_FILES[0]}
    return {**dataset_identity(metadata), "held_out_sha256": hashlib.sha256(
        json.dumps(held_out, sort_keys=True).encode()).hexdigest()}


def _file_sha256(metadata, name):
    record = (metadata.get("files") or {}).get(name) if isinstance(metadata.get("files"), dict) else None
    return record.get("sha256") if isinstance(record, dict) else None


def cache_problem(folder):
    """Why `folder` is not a complete, intact cache of this format version, or None if it is."""
    if not os.path.isdir(folder):
        return "no such folder"
    try:
        metadata = read_metadata(folder)
    except FileNotFoundError:
        return f"no {METADATA_FILE}"
    except (OSError, ValueError) as err:
        return f"cannot read {METADATA_FILE} ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if metadata.get("format_version") != FORMAT_VERSION:
        return f"format version {metadata.get('format_version')}, not {FORMAT_VERSION}"
    return files_problem(folder, metadata)


def is_replaceable(folder):
    """True iff convert.py may replace `folder`: it is empty, or provably a cache convert.py wrote
    (metadata.json says so, and there is nothing but regular files named as the cache's, so that
    replacing it loses nothing else: a cache of an older format or with a damaged file qualifies)."""
    from cli import is_own_folder  # cli sets the thread settings; importing it here keeps this module plain

    return is_own_folder(folder, CACHE_FILES, read_metadata, CREATED_BY)
