"""Convert a ratings file into the tensor cache that `ncf.py --data DIR` trains on.

    python convert.py --path data/ml-20m/ratings.csv --output data/cache/ml-20m
    python convert.py --path data/ml-1m/ratings.dat --output data/cache/ml-1m --min_ratings 20
    python convert.py --path /data/ml-20m/ratings.csv --output /data/cache/ml-20m --valid_negative 100 -s 1
    python convert.py --check data/cache/ml-20m     # exit 0 iff the cache is complete and intact

The recipe's flags work with its meaning and defaults: --path ($DATA_DIR/ml-20m/ratings.csv, the
recipe's /data/ml-20m/ratings.csv in the Docker image), --output, --valid_negative (also spelled
--negatives; 100) and -s/--seed (1). The recipe's --output default, /data itself, is the folder above
the input, which is never written here: the default is $DATA_DIR/cache/ml-20m, where prepare_dataset.sh
puts it.

Protocol: every interaction is a positive; users with fewer than --min_ratings interactions (counted
before de-duplication, as the recipe does) are dropped; ids become dense in file order; after a
stable sort by timestamp, duplicate (user, item) pairs keep their first occurrence and each user's
last remaining interaction is the test item. Each user gets --negatives distinct test negatives drawn
uniformly from the items they never interacted with. `--negatives_protocol recipe` draws them as the
2019 recipe did instead (see sample_recipe_negatives: with replacement, only training items excluded,
so the test item and repeats can occur). Everything is vectorised: no Python loop runs per user or per
row.

The cache is written into a sibling temporary folder with metadata.json last, then renamed into
place, so an interrupted run (Ctrl-C, a full disk, a kill) never leaves a folder that `cache_is_complete`
accepts, and a cache it was replacing stays in place until the new one is complete. metadata.json
records each tensor file's size and SHA-256; `--check` verifies them and the format version (with
--path, also that the cache was converted from that file, with --validation as given), so
prepare_dataset.sh rebuilds a damaged, outdated or other cache instead of calling it complete.

What --output may be, checked before any work: a new folder, an empty one, or a cache convert.py
wrote (see cache_format.is_replaceable: nothing but the cache's files, metadata.json saying
convert.py), which is then replaced. Never a folder holding anything else, nor the folder of the
input or any folder above it. `--check_output DIR [--path FILE]` runs only these checks.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before numpy/torch start their thread pools)

import argparse
import json
import os
import sys

import numpy as np
import pandas as pd
from tqdm import tqdm

from cache_format import (CREATED_BY, FORMAT_VERSION, METADATA_FILE, cache_problem, file_record, is_replaceable,
                          read_metadata, sha256_of)
from cli import UserError, check_output_folder, main_guard, staged_folder

FORMATS = ("ml-20m", "ml-1m", "ml-100k", "custom")
ML20M_COLUMNS = ("userId", "movieId", "timestamp")
CUSTOM_COLUMNS = ("user_id", "item_id", "timestamp")
# Users with fewer unseen items than this multiple of --negatives, or with more positives than unseen
# items, are sampled from their complement; for everyone else rejection sampling ends in a few rounds.
COMPLEMENT_FACTOR = 2
COMPLEMENT_CHUNK_CELLS = 1 << 24
# How test negatives are drawn (metadata "negatives_protocol"): "exact", this project's (distinct, never an
# item of the user), or "recipe", the 2019 recipe's (see sample_recipe_negatives).
PROTOCOLS = ("exact", "recipe")
MAX_NEGATIVES = np.iinfo(np.int32).max  # item ids are stored as int32; more is a typo, never a request


class _OneValue(argparse.Action):
    """Store the value; refuse a second, different one. --valid_negative (the recipe's name) and
    --negatives name one setting, and so do -s and --seed: silently keeping the last would hide a typo."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = getattr(self, "given", None)
        if given is not None and given[1] != value:
            parser.error(f"{given[0]} {given[1]} and {option_string} {value} disagree: both set "
                         f"{'/'.join(self.option_strings)}; give one value")
        self.given = (option_string, value)
        setattr(namespace, self.dest, value)


def parse_args(argv=None):
    """The flags, with `path_given` saying whether --path was on the command line (--check and --check_output
    compare with it only then)."""
    data_dir = os.environ.get("DATA_DIR", "./data")  # as ncf.py: the Docker image sets /data, the recipe's
    defaults = {"path": os.path.join(data_dir, "ml-20m", "ratings.csv"),
                "output": os.path.join(data_dir, "cache", "ml-20m"), "check": None, "check_output": None}
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    # SUPPRESS: absent unless given, so that parse_args can tell (and no "default: None" in the help).
    parser.add_argument("--path", default=argparse.SUPPRESS,
                        help="ratings file: ratings.csv, ratings.dat, u.data or a custom CSV (default: "
                             f"$DATA_DIR/ml-20m/ratings.csv, here {defaults['path']}; in the Docker image the "
                             "recipe's /data/ml-20m/ratings.csv)")
    parser.add_argument("--output", default=argparse.SUPPRESS,
                        help="cache folder to create (replaced atomically if it is a cache convert.py wrote; any "
                             f"other non-empty folder is refused) (default: $DATA_DIR/cache/ml-20m, here "
                             f"{defaults['output']})")
    parser.add_argument("--valid_negative", "--negatives", dest="negatives", metavar="N", type=int, default=100,
                        action=_OneValue,
                        help="test negatives per user (--valid_negative is the recipe's name)")
    parser.add_argument("-s", "--seed", type=int, default=1, action=_OneValue,
                        help="seed of the test-negative generator")
    parser.add_argument("--negatives_protocol", choices=PROTOCOLS, default="exact", action=_OneValue,
                        help="exact: distinct negatives, never an item of the user; recipe: as the 2019 recipe, drawn "
                             "with replacement and excluding only training items (the test item can be drawn)")
    parser.add_argument("--min_ratings", type=int, default=20,
                        help="drop users with fewer interactions (counted before de-duplication)")
    parser.add_argument("--validation", action="store_true",
                        help="also hold out each user's second-to-last item, with its own negatives, for model "
                             "selection (users with fewer than 3 distinct items get none)")
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="input format; auto detects it from the file name or header")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm display of the stages")
    parser.add_argument("--check", metavar="DIR", default=argparse.SUPPRESS,
                        help="only check whether DIR is a complete, intact cache of this version (with --path, "
                             "also that it was converted from that file, with --validation as given): exit 0 if "
                             "so, 1 (saying why) if not")
    parser.add_argument("--check_output", metavar="DIR", default=argparse.SUPPRESS,
                        help="only check that DIR may be written as --output (with --path, that it does not "
                             "hold the input): exit 0 if so, 2 (saying why) if not")
    given = vars(parser.parse_args(argv))
    return argparse.Namespace(**{**defaults, **given}, path_given="path" in given)


def validate_args(args):
    if not args.path or not args.output:
        raise UserError("--path and --output must not be empty (or use --check DIR alone)")
    if not os.path.isfile(args.path):
        raise UserError(f"--path {args.path}: no such file; download it with ./download_dataset.sh "
                        "or pass the right path")
    if os.path.getsize(args.path) == 0:
        raise UserError(f"--path {args.path} is empty; download it again or pass another file")
    if not 1 <= args.negatives <= MAX_NEGATIVES:
        raise UserError(f"--valid_negative/--negatives {args.negatives}: must be from 1 to {MAX_NEGATIVES}")
    if args.negatives_protocol == "recipe" and args.validation:
        raise UserError("--negatives_protocol recipe reproduces the recipe's test set, which has no validation split: "
                        "drop --validation, or keep the exact protocol (the default) to hold out validation items")
    if args.min_ratings < 1:
        raise UserError(f"--min_ratings {args.min_ratings}: must be at least 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be 0 or more")
    check_output(args.output, args.path)


def check_output(output, path=None):
    """Refuse, before any work, an --output that cannot be written or must not be replaced."""
    check_output_folder(output, {"--path": path}, is_replaceable, "a convert cache")


def source_problem(folder, path, validation):
    """Why the complete cache `folder` is not what `--path path` (with `validation`) converts into, or None.
    The file is compared by its SHA-256 only while it is there: a cache outlives its download."""
    metadata = read_metadata(folder)
    if (metadata.get("validation") is True) != validation:
        return f"it was converted {'without' if validation else 'with'} --validation"
    if os.path.isfile(path) and metadata.get("source_sha256") != sha256_of(path):
        return f"it was converted from another file than {path}"
    return None


def cache_is_complete(path):
    """True iff `path` holds a finished, intact cache of this format version (see cache_problem)."""
    return cache_problem(path) is None


def detect_format(path):
    name = os.path.basename(path)
    if name == "ratings.dat":
        return "ml-1m"
    if name == "u.data":
        return "ml-100k"
    with open(path, errors="replace", encoding="utf-8") as f:
        first = f.readline().strip()
    columns = set(first.split(","))
    if columns.issuperset(ML20M_COLUMNS):
        return "ml-20m"
    if columns.issuperset(CUSTOM_COLUMNS):
        return "custom"
    if "::" in first:
        return "ml-1m"
    if name == "ratings.csv":
        return "ml-20m"  # read_ratings then names the missing columns
    raise UserError(f"--path {path}: cannot tell its format from the name or the first line "
                    f"{first[:80]!r}; a custom CSV needs the header {','.join(CUSTOM_COLUMNS)}, "
                    "or pass --format")


def read_ratings(path, fmt):
    """Return (users, items, timestamps) as int64 arrays in file order."""
    header_columns = {"ml-20m": ML20M_COLUMNS, "custom": CUSTOM_COLUMNS}.get(fmt)
    try:
        if header_columns:
            header = pd.read_csv(path, nrows=0, engine="c").columns
            missing = [c for c in header_columns if c not in header]
            if missing:
                raise UserError(f"--path {path}: header lacks column(s) {','.join(missing)} "
                                f"needed by format {fmt}; the header must include "
                                f"{','.join(header_columns)} (or pass the right --format)")
            frame = pd.read_csv(path, engine="c", usecols=list(header_columns),
                                dtype={c: np.int64 for c in header_columns})
            columns = [frame[c] for c in header_columns]
        elif fmt == "ml-1m":
            # "a::b::c::d" split on ":" gives a,'',b,'',c,'',d; the C parser is ~20x faster than
            # the python engine a multi-character separator would need.
            frame = pd.read_csv(path, sep=":", header=None, engine="c", usecols=[0, 2, 6],
                                dtype=np.int64)
            columns = [frame[0], frame[2], frame[6]]
        else:  # ml-100k: user item rating timestamp, tab-separated
            frame = pd.read_csv(path, sep="\t", header=None, engine="c", usecols=[0, 1, 3],
                                dtype=np.int64)
            columns = [frame[0], frame[1], frame[3]]
    except pd.errors.EmptyDataError:
        raise UserError(f"--path {path} has no data; download it again or pass another file") from None
    except (ValueError, OverflowError, pd.errors.ParserError) as err:
        reason = str(err).splitlines()[0]
        # pandas reads 2**63 .. 2**64-1 as uint64 and refuses to cast it, and overflows above that.
        if isinstance(err, OverflowError) or "uint64" in reason:
            raise UserError(f"--path {path} has an id or timestamp too large for a 64-bit integer "
                            f"(above {np.iinfo(np.int64).max}); renumber the ids or check the file") from None
        raise UserError(f"--path {path} is not a valid {fmt} file ({reason}); ids and timestamps "
                        "must be integers; check the file or pass the right --format") from None
    if len(frame) == 0:
        raise UserError(f"--path {path} has a header but no rows; pass a file with interactions")
    return tuple(c.to_numpy(dtype=np.int64) for c in columns)


def filter_users(users, items, timestamps, min_ratings, path):
    codes, _ = pd.factorize(users)
    keep = np.bincount(codes)[codes] >= min_ratings
    if not keep.any():
        raise UserError(f"--path {path}: no user has at least --min_ratings {min_ratings} interactions; "
                        "lower --min_ratings or pass a larger file")
    return users[keep], items[keep], timestamps[keep]


def stable_order(values):
    """np.argsort(values, kind="stable") of an int64 array, usually ~9x faster.

    Packing (value, position) into one int64 lets numpy's SIMD np.sort do the work; its stable
    argsort took 6 s on 20M rows. Values spanning too wide a range to pack fall back to argsort.
    """
    bits = max(1, (len(values) - 1).bit_length())
    low = values.min()
    if (int(values.max()) - int(low)) >> (62 - bits):
        return np.argsort(values, kind="stable")
    packed = ((values - low) << bits) | np.arange(len(values))
    packed.sort()
    return packed & ((1 << bits) - 1)


def split_train_test(user, item, timestamps, num_items, validation=False):
    """Return (positive keys, train keys, test items, validation items) where key = user * num_items + item.

    Positive keys are sorted and unique: every (user, item) the user interacted with. With `validation`
    each user's latest remaining pair after the test item is held out too (item -1 for a user with fewer
    than 3 distinct items, who keeps it for training); else validation items is None.
    """
    by_time = stable_order(timestamps)
    keys = user[by_time] * num_items + item[by_time]
    # Within equal keys the stable order keeps time order, so each pair's first entry is its
    # earliest copy, the one de-duplication keeps; `first` is that copy's rank in time.
    first = stable_order(keys)
    keys = keys[first]
    earliest = np.r_[True, keys[1:] != keys[:-1]]
    positive_keys, first = keys[earliest], first[earliest]
    is_test = latest_of_each_user(positive_keys, first, num_items)
    test_items = positive_keys[is_test] % num_items
    train_keys, train_first = positive_keys[~is_test], first[~is_test]
    if not validation:
        return positive_keys, train_keys, test_items, None
    is_valid = latest_of_each_user(train_keys, train_first, num_items)
    users = train_keys // num_items
    is_valid &= np.bincount(users, minlength=len(test_items))[users] >= 2  # keep one pair to train on
    valid_items = np.full(len(test_items), -1, dtype=np.int64)
    valid_items[users[is_valid]] = train_keys[is_valid] % num_items
    return positive_keys, train_keys[~is_valid], test_items, valid_items


def latest_of_each_user(keys, rank_in_time, num_items):
    """Mask of the entry of each user with the highest rank in time, for keys sorted by (user, item)."""
    key_user = keys // num_items
    starts = np.flatnonzero(np.r_[True, key_user[1:] != key_user[:-1]])
    latest = np.maximum.reduceat(rank_in_time, starts)
    return rank_in_time == np.repeat(latest, np.diff(np.r_[starts, len(rank_in_time)]))


def is_positive(positive_keys, keys):
    idx = np.searchsorted(positive_keys, keys)
    return positive_keys[np.minimum(idx, len(positive_keys) - 1)] == keys


def repeated_in_row(rows):
    """Mark every entry that equals an earlier entry of its row."""
    order = np.argsort(rows, axis=1, kind="stable")
    ordered = np.take_along_axis(rows, order, axis=1)
    repeat = np.zeros_like(rows, dtype=bool)
    np.put_along_axis(repeat, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
    return repeat


def sample_by_rejection(users, positive_keys, num_items, negatives, rng):
    """Redraw the slots that hit a positive or repeat an item until every row is valid.

    The process treats all unseen items alike, so each row is a uniform random set of them.
    """
    out = rng.integers(0, num_items, size=(len(users), negatives))
    pending = np.arange(len(users))
    while len(pending):
        rows = out[pending]
        bad = is_positive(positive_keys, users[pending, None] * num_items + rows) | repeated_in_row(rows)
        failing = bad.any(axis=1)
        pending, bad = pending[failing], bad[failing]
        redraw = out[pending]
        redraw[bad] = rng.integers(0, num_items, size=int(bad.sum()))
        out[pending] = redraw
    return out


def segment_positions(lo, hi):
    """Concatenation of arange(lo[i], hi[i]) for all i, without a Python loop."""
    lengths = hi - lo
    offsets = np.repeat(lo - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
    return np.arange(lengths.sum()) + offsets


def sample_from_complement(users, positive_keys, num_items, negatives, rng):
    """For users with few unseen items: random keys over all items, positives pushed last."""
    out = np.empty((len(users), negatives), dtype=np.int64)
    chunk = max(1, COMPLEMENT_CHUNK_CELLS // num_items)
    for start in range(0, len(users), chunk):
        block = users[start:start + chunk]
        lo = np.searchsorted(positive_keys, block * num_items)
        hi = np.searchsorted(positive_keys, (block + 1) * num_items)
        weights = rng.random((len(block), num_items))
        rows = np.repeat(np.arange(len(block)), hi - lo)
        weights[rows, positive_keys[segment_positions(lo, hi)] % num_items] = 2.0
        out[start:start + chunk] = np.argpartition(weights, negatives - 1, axis=1)[:, :negatives]
    return out


def sample_negatives(positive_keys, num_users, num_items, negatives, seed):
    positives_per_user = np.bincount(positive_keys // num_items, minlength=num_users)
    unseen = num_items - positives_per_user
    short = int((unseen < negatives).sum())
    if short:
        raise UserError(f"{short} user(s) have fewer than --valid_negative/--negatives {negatives} items they never "
                        f"interacted with (of {num_items} items); use a smaller --negatives or a "
                        "dataset with more items")
    rng = np.random.default_rng(seed)
    dense = (unseen < COMPLEMENT_FACTOR * negatives) | (positives_per_user > unseen)
    out = np.empty((num_users, negatives), dtype=np.int64)
    everyone = np.arange(num_users)
    out[~dense] = sample_by_rejection(everyone[~dense], positive_keys, num_items, negatives, rng)
    out[dense] = sample_from_complement(everyone[dense], positive_keys, num_items, negatives, rng)
    return out


def sample_recipe_negatives(train_keys, num_users, num_items, negatives, seed):
    """Test negatives drawn as the 2019 recipe's convert.py draws them (--negatives_protocol recipe).

    Each of a user's draws is uniform, with replacement, over the items 0..S-1 the user did not train on,
    S being the largest item id among the training pairs + 1 (the recipe sizes its item range from them).
    Only training items are excluded, so the user's test item can be drawn and an item can repeat: the
    recipe's evaluation masks both (its dup_mask), and without that mask they count against the model.
    The rules are the recipe's, not its torch random stream: a seed gives other items than the recipe's.
    """
    train_users, train_items = np.divmod(train_keys, num_items)
    span = int(train_items.max()) + 1
    per_user = np.bincount(train_users, minlength=num_users)
    if negatives > span:
        raise UserError(f"--valid_negative/--negatives {negatives}: more than the {span} items the recipe protocol "
                        "draws from; with replacement the extra draws only repeat items, which its evaluation "
                        f"masks: use at most {span}")
    full = int((per_user == span).sum())
    if full:
        raise UserError(f"{full} user(s) trained on every one of the {span} items the recipe protocol draws from, "
                        "so it has nothing to draw for them (the recipe's sampler never ends): use the exact "
                        "protocol or a dataset with more items")
    rank = np.random.default_rng(seed).integers(0, (span - per_user)[:, None], size=(num_users, negatives))
    return nth_untrained_item(train_users, train_items, per_user, span, rank)


def nth_untrained_item(train_users, train_items, per_user, span, rank):
    """Item number rank[u, j] (from 0) among the items 0..span-1 that user u did not train on.

    With a user's training items t_0 < t_1 < ..., t_j - j of the allowed items lie below t_j; the r-th
    allowed item is r plus the count of training items with t_j - j <= r: one searchsorted for all users.
    """
    start = np.r_[0, np.cumsum(per_user)[:-1]]
    allowed_below = train_items - (np.arange(len(train_items)) - start[train_users])
    keys = train_users * (span + 1) + allowed_below  # sorted, since the pairs are sorted by (user, item)
    users = np.arange(len(per_user))[:, None]
    skipped = np.searchsorted(keys, users * (span + 1) + rank, side="right") - start[:, None]
    return rank + skipped


def draw_negatives(keys, num_users, num_items, negatives, seed, protocol, validation):
    """(test negatives, validation negatives or None); keys = (positive keys, training keys)."""
    positive_keys, train_keys = keys
    if protocol == "recipe":
        return sample_recipe_negatives(train_keys, num_users, num_items, negatives, seed), None
    test_negatives = sample_negatives(positive_keys, num_users, num_items, negatives, seed)
    if not validation:
        return test_negatives, None
    # Its own stream, so that the test negatives are those of a cache without --validation.
    return test_negatives, sample_negatives(positive_keys, num_users, num_items, negatives, [seed, 1])


def write_cache(output, tensors, metadata):
    """Write into a sibling temporary folder (metadata.json last, with each file's size and SHA-256), then
    rename it into place (cli.staged_folder: on any failure or interruption the temporary folder goes
    and a cache that was at `output` stays; an OSError, a full disk, becomes an EnvironmentFailure)."""
    # torch takes seconds to import; keeping it here lets `--check` and cache_is_complete stay instant.
    import torch

    with staged_folder(output, is_replaceable, "cache") as tmp:
        files = {}
        for name, array in tensors.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                try:
                    torch.save(torch.from_numpy(np.ascontiguousarray(array)), f)
                except RuntimeError as err:
                    # torch's zip writer hides a failed write (a full disk) behind its own error.
                    if isinstance(err.__context__, OSError):
                        raise err.__context__ from None
                    raise
            files[name] = file_record(path)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump({**metadata, "files": files}, f, indent=2)


def cache_tensors(train_keys, test_items, test_negatives, user_ids, item_ids, num_items):
    """The cache's tensors (as numpy arrays) by file name: ids int32, original ids int64."""
    num_users = len(user_ids)
    return {
        "train_ratings.pt": np.stack([train_keys // num_items, train_keys % num_items], axis=1).astype(np.int32),
        "test_ratings.pt": np.stack([np.arange(num_users), test_items], axis=1).astype(np.int32),
        "test_negatives.pt": test_negatives.astype(np.int32),
        "user_ids.pt": np.asarray(user_ids, dtype=np.int64),
        "item_ids.pt": np.asarray(item_ids, dtype=np.int64),
    }


def convert(args):
    fmt = detect_format(args.path) if args.format == "auto" else args.format
    stages = tqdm(total=6, desc="convert", unit="stage", file=sys.stderr,
                  disable=args.no_progress or not sys.stderr.isatty())

    def stage(name):
        stages.set_postfix_str(name)

    stage("read")
    users, items, timestamps = read_ratings(args.path, fmt)
    stages.update()
    stage("filter")
    users, items, timestamps = filter_users(users, items, timestamps, args.min_ratings, args.path)
    user, user_ids = pd.factorize(users)
    item, item_ids = pd.factorize(items)
    num_users, num_items = len(user_ids), len(item_ids)
    stages.update()
    stage("split")
    positive_keys, train_keys, test_items, valid_items = split_train_test(user, item, timestamps, num_items,
                                                                          args.validation)
    if len(train_keys) == 0:
        raise UserError(f"--path {args.path}: no training pairs are left, because each of the {num_users} "
                        "user(s) kept has a single distinct item, which becomes their test item; pass a file "
                        "where users have at least two distinct items")
    if args.validation and not (valid_items >= 0).any():
        raise UserError(f"--validation: none of the {num_users} user(s) has the 3 distinct items it takes to hold out "
                        "a validation item besides the test item and one to train on, so the split would be empty: "
                        "convert without --validation, or pass data (or a --min_ratings) that keeps longer histories")
    stages.update()
    stage("negatives")
    test_negatives, valid_negatives = draw_negatives((positive_keys, train_keys), num_users, num_items, args.negatives,
                                                     args.seed, args.negatives_protocol, args.validation)
    stages.update()
    stage("hash")
    source_sha256 = sha256_of(args.path)
    stages.update()
    stage("write")
    tensors = cache_tensors(train_keys, test_items, test_negatives, user_ids, item_ids, num_items)
    if args.validation:
        tensors["valid_ratings.pt"] = np.stack([np.arange(num_users), valid_items], axis=1).astype(np.int32)
        tensors["valid_negatives.pt"] = valid_negatives.astype(np.int32)
    metadata = {
        "format_version": FORMAT_VERSION, "source_file": os.path.basename(args.path), "source_sha256": source_sha256,
        "format": fmt, "num_users": num_users, "num_items": num_items, "num_train": len(train_keys),
        "num_test": num_users, "min_ratings": args.min_ratings, "negatives": args.negatives, "seed": args.seed,
        "negatives_protocol": args.negatives_protocol, "created_by": CREATED_BY,
    }
    if args.validation:
        metadata.update(validation=True, num_valid=int((valid_items >= 0).sum()))
    write_cache(args.output, tensors, metadata)
    stages.update()
    stages.close()
    return metadata


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.check is not None:
        problem = cache_problem(args.check)
        if problem is None:  # the loader's own checks too (ids in range, order): what ncf.py will refuse
            from dataloading import load_cache

            try:
                load_cache(args.check)
            except UserError as err:
                problem = str(err)
        if problem is None and args.path_given:
            problem = source_problem(args.check, args.path, args.validation)
        if problem:
            print(f"{args.check} is not a complete cache: {problem}")
        sys.exit(1 if problem else 0)
    if args.check_output is not None:
        check_output(args.check_output, args.path if args.path_given else None)
        return
    validate_args(args)
    metadata = convert(args)
    print(f"wrote {args.output}: {metadata['num_users']} users, {metadata['num_items']} items, "
          f"{metadata['num_train']} train pairs, {args.negatives} negatives per user "
          f"({args.negatives_protocol} protocol)")


if __name__ == "__main__":
    main()
