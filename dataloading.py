"""Cached MovieLens tensors: loading, device-resident epoch sampling, evaluation candidates.

The cache is written by convert.py (see its docstring for the protocol). Everything here works on
whatever device it is given; nothing assumes CUDA.
"""
import os
import warnings
from dataclasses import dataclass

import torch

from cache_format import (
    FILE_OF,
    FORMAT_VERSION,
    METADATA_FILE,
    VALIDATION_FIELDS,
    files_problem,
    is_replaceable,
    read_metadata,
    tensor_files,
)
from cli import UserError


@dataclass(frozen=True)
class Cache:
    train: torch.Tensor  # [N, 2] (user, item), sorted by (user, item)
    test: torch.Tensor  # [U, 2], row u is (u, test item of u)
    test_negatives: torch.Tensor  # [U, negatives]
    user_ids: torch.Tensor  # [U] original id of each dense user id
    item_ids: torch.Tensor  # [I] original id of each dense item id
    metadata: dict
    valid: torch.Tensor = None  # [U, 2] with --validation: row u is (u, validation item of u or -1)
    valid_negatives: torch.Tensor = None  # [U, negatives]
    path: str = ""  # the folder it was loaded from, for messages

    @property
    def has_validation(self):
        return self.valid is not None

    @property
    def num_users(self):
        return self.metadata["num_users"]

    @property
    def num_items(self):
        return self.metadata["num_items"]


def safe_load(path, what, fix):
    """torch.load restricted to tensors and plain data (weights_only), with one-line user errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist: {fix}")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip (PK), older torch a pickle (protocol byte 0x80): anything else, such as a text
    # or CSV file, would reach the unpickler and fail with a message about pickles or an empty list.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UserError(f"cannot load {what} {path} (it is not a file torch.save wrote: it starts with {head!r}): "
                        f"{fix}")
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


COUNT_FIELDS = ("num_users", "num_items", "num_train", "negatives")
INTEGER_DTYPES = (torch.int32, torch.int64)


def load_cache(path, flag="--data"):
    """Load and check a cache folder written by convert.py: its format version, each file's size and
    SHA-256 against metadata.json, shapes against its counts, and (cheap, vectorised) that ids are in
    range and training pairs sorted. A problem is a UserError naming the file and a fix that works."""
    if not os.path.isdir(path):
        raise UserError(f"no dataset cache at {path}: run ./prepare_dataset.sh NAME (or convert.py) to create it, "
                        f"or pass {flag} with the right folder")
    fix = _rebuild_advice(path)
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise UserError(f"dataset cache {path} is incomplete (no metadata.json): {fix}")
    try:
        metadata = read_metadata(path)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read {meta_path} ({reason}): {fix}") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"dataset cache {path} has format version {metadata.get('format_version')}, "
            f"this code reads version {FORMAT_VERSION}: {fix}"
        )
    for key in COUNT_FIELDS:
        if key not in metadata:
            raise UserError(f"{meta_path} lacks the field '{key}': {fix}")
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{meta_path}: the field '{key}' is {value!r:.60}, not a count: {fix}")
    files = tensor_files(metadata)
    tensors = {field: safe_load(os.path.join(path, name), "cache file", fix) for field, name in FILE_OF.items()
               if name in files}
    cache = Cache(**tensors, metadata=metadata, path=path)
    _check_cache(cache, path, fix)
    problem = files_problem(path, metadata)
    if problem:
        raise UserError(f"dataset cache {path}: {problem}: {fix}")
    _check_ids(cache, path, fix)
    if cache.has_validation and not (cache.valid[:, 1] >= 0).any():
        raise UserError(f"dataset cache {path} has a validation split in which no user has a validation item, so "
                        f"nothing could be selected on it: convert it without --validation")
    return cache


def _rebuild_advice(path):
    """The fix for a broken cache at `path`: one that works, since convert.py replaces only its own caches."""
    command = f"convert.py --path RATINGS --output {path}{_convert_settings(path)}"
    if is_replaceable(path):
        return f"rebuild it with ./prepare_dataset.sh NAME (or {command})"
    return (f"move {path} away (it holds files convert.py did not write, so nothing replaces it), then rebuild it "
            f"with ./prepare_dataset.sh NAME (or {command})")


def _convert_settings(path):
    """The convert flags a cache was written with, as far as its metadata.json still says: a rebuild with
    convert's defaults would draw other negatives (or no validation split) and give other figures."""
    try:
        meta = read_metadata(path)
    except (OSError, ValueError):
        return ""
    flags = [f" --{flag} {meta[key]}" for flag, key in (("negatives", "negatives"), ("seed", "seed"),
                                                       ("min_ratings", "min_ratings"))
             if isinstance(meta.get(key), int) and not isinstance(meta.get(key), bool)]
    return "".join(flags) + (" --validation" if meta.get("validation") is True else "")


def _check_cache(cache, path, fix):
    meta = cache.metadata
    users, negatives = meta["num_users"], meta["negatives"]
    expected = {"train": (meta["num_train"], 2), "test": (users, 2), "test_negatives": (users, negatives),
                "user_ids": (users,), "item_ids": (meta["num_items"],), "valid": (users, 2),
                "valid_negatives": (users, negatives)}
    for field, shape in expected.items():
        tensor = getattr(cache, field)
        if field in VALIDATION_FIELDS and not cache.has_validation:
            continue
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{path}/{FILE_OF[field]} has shape {got} but metadata.json says {shape}: {fix}")
        if tensor.dtype not in INTEGER_DTYPES:
            raise UserError(f"{path}/{FILE_OF[field]} holds {tensor.dtype} values, not integer ids: {fix}")
    if meta["num_users"] == 0 or meta["num_train"] == 0:
        raise UserError(f"dataset cache {path} is empty: {fix}")


def _check_ids(cache, path, fix):
    """What indexing and the CSR of training pairs rely on; one pass over each tensor."""
    users, items = cache.num_users, cache.num_items

    def outside(values, count):
        return bool(((values < 0) | (values >= count)).any())

    problems = (
        ("train", lambda: outside(cache.train[:, 0], users), f"user ids outside 0..{users - 1}"),
        ("train", lambda: outside(cache.train[:, 1], items), f"item ids outside 0..{items - 1}"),
        ("train", lambda: not _sorted_unique_pairs(cache.train, items),
         "pairs that are not sorted by (user, item) or that repeat"),
        ("test", lambda: not torch.equal(cache.test[:, 0].long(), torch.arange(users)),
         "rows that are not users 0..U-1 in order"),
        ("test", lambda: outside(cache.test[:, 1], items), f"item ids outside 0..{items - 1}"),
        ("test_negatives", lambda: outside(cache.test_negatives, items), f"item ids outside 0..{items - 1}"),
    )
    if cache.has_validation:
        problems += (
            ("valid", lambda: not torch.equal(cache.valid[:, 0].long(), torch.arange(users)),
             "rows that are not users 0..U-1 in order"),
            ("valid", lambda: outside(cache.valid[:, 1] + 1, items + 1), f"item ids outside -1..{items - 1}"),
            ("valid_negatives", lambda: outside(cache.valid_negatives, items), f"item ids outside 0..{items - 1}"),
        )
    for field, broken, what in problems:
        if broken():
            raise UserError(f"{path}/{FILE_OF[field]} has {what}: {fix}")


def _sorted_unique_pairs(train, num_items):
    keys = train[:, 0].long() * num_items + train[:, 1].long()
    return bool((keys[1:] > keys[:-1]).all())


def train_positives_csr(train, num_users):
    """Row pointers into the (user, item)-sorted training pairs: user u owns rows ptr[u]:ptr[u+1]."""
    counts = torch.bincount(train[:, 0].long(), minlength=num_users)
    return torch.cat((torch.zeros(1, dtype=torch.long), counts.cumsum(0)))


def permutation_dtype(count):
    """int32 where it holds a permutation of `count` samples, else int64. torch draws the same permutation in both;
    int32's takes half the memory, and a batch's % and gather of int32 indices (int64 % is a division a sample)
    made a batch of 2^20 of ml-20m's samples 20-26 against 30-51 ms on a CPU (benchmarks/README.md)."""
    return torch.int32 if count <= torch.iinfo(torch.int32).max else torch.int64


class EpochSampler:
    """Training samples of one epoch, generated on the device (the recipe's approximate sampling).

    An epoch is every positive once plus `negatives` negatives per positive, whose items are drawn
    uniformly from all items without checking the user's positives, all in one random order. Sample j
    of the epoch is positive j when j < N, otherwise a negative for positive j % N. Only the
    permutation is materialised; each batch's users, items and labels are gathered from it, so the
    device holds the positives plus one index per sample, and nothing goes back to the host.

    Every rank draws the same permutation and the same negative items for each global batch (the
    generator is seeded by seed and epoch) and takes its own share of it, so N processes see exactly
    the samples that one process with the same global batch sees, and a resumed run sees the same
    epochs as an uninterrupted one.
    """

    def __init__(self, train, num_items, negatives, device, seed):
        # A positive's user and item side by side, read as one 8-byte word: a batch gathers each positive in one random
        # access, not two (at ml-20m's 20M positives, 24 against 36 ms a batch of 2^20 on a CPU; benchmarks/README.md).
        self.pairs = train.to(device=device, dtype=torch.int32).contiguous().view(torch.int64).view(-1)
        self.users, self.items = self.pairs.view(torch.int32).view(-1, 2).unbind(1)
        self.num_positives = train.shape[0]
        self.num_items = num_items
        self.samples_per_epoch = self.num_positives * (1 + negatives)
        self.device = torch.device(device)
        self.seed = seed
        self.generator = torch.Generator(device=self.device)

    def steps_per_epoch(self, global_batch, divisor):
        full, rest = divmod(self.samples_per_epoch, global_batch)
        return full + (1 if rest >= divisor else 0)

    def epoch(self, epoch, global_batch, rank, world_size, grads_accumulated):
        """Yield, per optimizer step, (micro_batches, global_batch_size) for this rank.

        micro_batches is a list of (users, items, labels) tensors. The last global batch of an epoch
        is cut to a multiple of world_size * grads_accumulated so every rank and micro-batch has an
        equal share (at most world_size * grads_accumulated - 1 samples per epoch are skipped).
        """
        divisor = world_size * grads_accumulated
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.samples_per_epoch, device=self.device, generator=self.generator,
                              dtype=permutation_dtype(self.samples_per_epoch))
        for step in range(self.steps_per_epoch(global_batch, divisor)):
            start = step * global_batch
            size = min(global_batch, self.samples_per_epoch - start)
            size -= size % divisor
            random_items = torch.randint(
                self.num_items, (size,), device=self.device, dtype=torch.int32, generator=self.generator
            )
            share = size // world_size
            lo = rank * share
            idx = perm[start + lo : start + lo + share]
            random_items = random_items[lo : lo + share]
            is_positive = idx < self.num_positives
            source = idx % self.num_positives
            pairs = self.pairs.index_select(0, source).view(torch.int32).view(-1, 2)
            users = pairs[:, 0].contiguous()
            items = torch.where(is_positive, pairs[:, 1], random_items)
            labels = is_positive.float()
            micro = share // grads_accumulated
            batches = list(zip(users.split(micro), items.split(micro), labels.split(micro), strict=True))
            yield batches, size


@dataclass(frozen=True)
class TestData:
    """Evaluation candidates on the device: column 0 is the held-out item, the rest its negatives."""

    users: torch.Tensor  # [U_rank] int32, this rank's share of the evaluated users
    candidates: torch.Tensor  # [U_rank, 1 + negatives] int32
    total_samples: int  # user-item pairs scored over all ranks
    # [U_rank, negatives] bool: which negatives count in the rank. None: all of them (distinct negatives, never
    # the held-out item: convert's exact protocol). A cache of the recipe's protocol repeats items and may
    # hold the held-out item among them; as the recipe's dup_mask does, only an item's first appearance counts.
    counted: torch.Tensor = None

    @classmethod
    def from_cache(cls, cache, device, rank=0, world_size=1, split="test"):
        """The test items, or with split="valid" the validation items (users who have one)."""
        held_out, negatives = (cache.test, cache.test_negatives) if split == "test" else \
            (cache.valid, cache.valid_negatives)
        users = rank_share(cache.num_users, rank, world_size)
        users = users[held_out[users, 1] >= 0]
        candidates = torch.cat((held_out[users, 1:2], negatives[users]), dim=1)
        counted = first_appearances(candidates)[:, 1:] if cache.metadata.get("negatives_protocol") == "recipe" else None
        return cls(
            users=users.to(device=device, dtype=torch.int32),
            candidates=candidates.to(device=device, dtype=torch.int32),
            total_samples=int((held_out[:, 1] >= 0).sum()) * candidates.shape[1],
            counted=None if counted is None else counted.to(device),
        )

    @property
    def num_candidates(self):
        return self.candidates.shape[1]


@dataclass(frozen=True)
class FullRankingData:
    """Test positives plus the training items to exclude, for ranking against every item."""

    users: torch.Tensor  # [U_rank] int32, this rank's share of the test users
    positives: torch.Tensor  # [U_rank] test item of each user
    train_rows: torch.Tensor  # [M] row (index into users) of each of these users' training pairs
    train_items: torch.Tensor  # [M] item of each of these users' training pairs
    row_ptr: list  # U_rank + 1 host ints: row r owns train pairs row_ptr[r]:row_ptr[r+1] (no tensor read per chunk)
    num_items: int

    @classmethod
    def from_cache(cls, cache, device, rank=0, world_size=1):
        users = rank_share(cache.num_users, rank, world_size)
        ptr = train_positives_csr(cache.train, cache.num_users)
        first, end = int(users[0]) if len(users) else 0, int(users[-1]) + 1 if len(users) else 0
        pairs = cache.train[ptr[first] : ptr[end]]
        return cls(
            users=users.to(device=device, dtype=torch.int32),
            positives=cache.test[users, 1].to(device=device),
            train_rows=(pairs[:, 0] - first).to(device=device),
            train_items=pairs[:, 1].to(device=device),
            row_ptr=(ptr[first : end + 1] - ptr[first]).tolist(),
            num_items=cache.num_items,
        )

    def train_pairs_of(self, lo, hi):
        """(row - lo, item) of the training pairs of rows lo:hi."""
        a, b = self.row_ptr[lo], self.row_ptr[hi]
        return self.train_rows[a:b] - lo, self.train_items[a:b]


def first_appearances(candidates):
    """[users, C] bool: True where a row's item appears for the first time, reading left to right (so the
    held-out item in column 0 always counts, and a negative repeating it or an earlier negative does not)."""
    order = torch.sort(candidates, dim=1, stable=True)
    repeat = torch.zeros_like(candidates, dtype=torch.bool)
    repeat[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    return ~torch.zeros_like(repeat).scatter_(1, order.indices, repeat)


def rank_share(count, rank, world_size):
    """This rank's contiguous share of range(count); shares differ by at most one."""
    return torch.tensor_split(torch.arange(count), world_size)[rank]
