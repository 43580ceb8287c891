"""convert.py on tiny hand-written files in every §3.1 format, with the expected cache written out."""
import json
import os

import numpy as np
import pytest
import torch

import convert
from cache_format import TENSOR_FILES

# One small history, written below in each format. File order matters: it sets the dense ids.
#   user 20: 200@1, 400@2, 300@2   -> 300 is the latest (tie at t=2 broken by file order)
#   user 10: 200@3, 100@5, 300@9, 500@9, 100@10
#            -> the repeat of 100 at t=10 is dropped (first occurrence kept), so 500 is the latest
#   user 30: one rating -> dropped by --min_ratings 2, and its item 700 with it
#   user 40: 600@1, 600@2 -> two ratings before de-duplication, so kept; one item, no train pair
ROWS = [  # user, item, rating, timestamp
    (20, 200, 4, 1),
    (10, 100, 4, 5),
    (10, 200, 3, 3),
    (30, 700, 1, 1),
    (20, 400, 4, 2),
    (10, 300, 5, 9),
    (40, 600, 2, 1),
    (20, 300, 3, 2),
    (10, 100, 2, 10),
    (10, 500, 1, 9),
    (40, 600, 5, 2),
]
EXPECTED_USER_IDS = [20, 10, 40]
EXPECTED_ITEM_IDS = [200, 100, 400, 300, 600, 500]
EXPECTED_TRAIN = [[0, 0], [0, 2], [1, 0], [1, 1], [1, 3]]
EXPECTED_TEST = [[0, 3], [1, 5], [2, 4]]
# Items each dense user never interacted with; user 1 has exactly two.
EXPECTED_UNSEEN = [{1, 4, 5}, {2, 4}, {0, 1, 2, 3, 5}]


def write_ml20m(folder):
    lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r}.0,{t}" for u, i, r, t in ROWS]
    return _write(folder / "ratings.csv", lines)


def write_ml1m(folder):
    return _write(folder / "ratings.dat", [f"{u}::{i}::{r}::{t}" for u, i, r, t in ROWS])


def write_ml100k(folder):
    return _write(folder / "u.data", [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ROWS])


def write_custom(folder):
    # Extra columns, text included, are ignored.
    lines = ["source,item_id,user_id,timestamp,rating"] + [f"web,{i},{u},{t},{r}" for u, i, r, t in ROWS]
    return _write(folder / "interactions.csv", lines)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


WRITERS = {"ml-20m": write_ml20m, "ml-1m": write_ml1m, "ml-100k": write_ml100k, "custom": write_custom}


def run_convert(path, output, *extra):
    convert.main(["--path", str(path), "--output", str(output), "--no_progress", *map(str, extra)])
    return {name: torch.load(output / name, weights_only=True) for name in TENSOR_FILES}


def load_metadata(output):
    return json.loads((output / "metadata.json").read_text())


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_gives_the_protocol_cache(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path)
    cache = run_convert(path, tmp_path / "cache", "--min_ratings", 2, "--negatives", 2)

    assert cache["user_ids.pt"].tolist() == EXPECTED_USER_IDS
    assert cache["item_ids.pt"].tolist() == EXPECTED_ITEM_IDS
    assert cache["train_ratings.pt"].tolist() == EXPECTED_TRAIN
    assert cache["test_ratings.pt"].tolist() == EXPECTED_TEST
    assert cache["test_negatives.pt"].shape == (3, 2)
    assert load_metadata(tmp_path / "cache")["format"] == fmt


def test_dtypes_and_metadata(tmp_path):
    path = write_ml20m(tmp_path)
    cache = run_convert(path, tmp_path / "cache", "--min_ratings", 2, "--negatives", 2, "--seed", 7)

    for name in ("train_ratings.pt", "test_ratings.pt", "test_negatives.pt"):
        assert cache[name].dtype == torch.int32
    for name in ("user_ids.pt", "item_ids.pt"):
        assert cache[name].dtype == torch.int64
    metadata = load_metadata(tmp_path / "cache")
    files = metadata.pop("files")
    assert files == {name: {"bytes": (tmp_path / "cache" / name).stat().st_size,
                            "sha256": convert.sha256_of(tmp_path / "cache" / name)} for name in TENSOR_FILES}
    assert metadata == {
        "format_version": 2,
        "source_file": "ratings.csv",
        "source_sha256": convert.sha256_of(path),
        "format": "ml-20m",
        "num_users": 3,
        "num_items": 6,
        "num_train": 5,
        "num_test": 3,
        "min_ratings": 2,
        "negatives": 2,
        "seed": 7,
        "negatives_protocol": "exact",
        "created_by": "convert.py",
    }
    assert sorted(os.listdir(tmp_path)) == ["cache", "ratings.csv"]  # no temp folder left


def test_dense_ids_map_back_to_original_pairs(tmp_path):
    cache = run_convert(write_ml1m(tmp_path), tmp_path / "cache", "--min_ratings", 2, "--negatives", 2)
    users, items = cache["user_ids.pt"], cache["item_ids.pt"]
    pairs = torch.cat([cache["train_ratings.pt"], cache["test_ratings.pt"]]).long()
    original = {(users[u].item(), items[i].item()) for u, i in pairs.tolist()}
    assert original == {(u, i) for u, i, _, _ in ROWS if u != 30}


def test_min_ratings_drops_users_and_their_items(tmp_path):
    path = write_ml20m(tmp_path)
    # User 40's two rows (one distinct item) kept it at --min_ratings 2; at 3 it goes, with item 600.
    cache = run_convert(path, tmp_path / "cache", "--min_ratings", 3, "--negatives", 1)
    assert cache["user_ids.pt"].tolist() == [20, 10]
    assert cache["item_ids.pt"].tolist() == [200, 100, 400, 300, 500]
    assert cache["test_ratings.pt"].tolist() == [[0, 3], [1, 4]]


def test_negatives_are_distinct_unseen_items(tmp_path):
    cache = run_convert(write_ml20m(tmp_path), tmp_path / "cache", "--min_ratings", 2, "--negatives", 2)
    for user, row in enumerate(cache["test_negatives.pt"].tolist()):
        assert len(set(row)) == 2
        assert set(row) <= EXPECTED_UNSEEN[user]
    assert set(cache["test_negatives.pt"][1].tolist()) == {2, 4}  # the only two unseen items


def random_custom_file(path, users=60, items=40, seed=0):
    """Users from 2 to 38 interactions of 40 items: both the rejection and the complement sampler run."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for user in range(users):
        count = 2 + user * 36 // (users - 1)
        for t, item in enumerate(rng.choice(items, size=count, replace=False)):
            lines.append(f"{1000 + user},{7 * item},{t}")
    return _write(path, lines)


def test_negatives_never_hit_positives_and_follow_the_seed(tmp_path):
    path = random_custom_file(tmp_path / "random.csv")
    first = run_convert(path, tmp_path / "a", "--min_ratings", 2, "--negatives", 2, "--seed", 1)
    again = run_convert(path, tmp_path / "b", "--min_ratings", 2, "--negatives", 2, "--seed", 1)
    other = run_convert(path, tmp_path / "c", "--min_ratings", 2, "--negatives", 2, "--seed", 2)

    negatives = first["test_negatives.pt"]
    positives = torch.cat([first["train_ratings.pt"], first["test_ratings.pt"]])
    for user in range(len(negatives)):
        seen = set(positives[positives[:, 0] == user, 1].tolist())
        row = negatives[user].tolist()
        assert len(set(row)) == len(row)
        assert not seen & set(row)
    assert torch.equal(negatives, again["test_negatives.pt"])
    assert not torch.equal(negatives, other["test_negatives.pt"])


@pytest.mark.parametrize("positives, negatives", [
    ([0, 1], 2),  # 6 unseen items, 2 per draw: rejection sampling, each item in 1/3 of the draws
    ([0, 1, 2, 3, 4], 1),  # more positives than unseen items: complement sampling, 1/3 again
])
def test_negatives_are_uniform_over_unseen_items(positives, negatives):
    counts = np.zeros(8)
    for seed in range(600):
        counts[convert.sample_negatives(np.array(positives), 1, 8, negatives, seed).ravel()] += 1
    assert counts[positives].sum() == 0
    unseen = np.setdiff1d(np.arange(8), positives)
    assert np.all(np.abs(counts[unseen] / 600 - 1 / 3) < 0.08)


def test_rerun_replaces_a_complete_cache(tmp_path):
    path = write_ml20m(tmp_path)
    run_convert(path, tmp_path / "cache", "--min_ratings", 2, "--negatives", 1)
    cache = run_convert(path, tmp_path / "cache", "--min_ratings", 2, "--negatives", 2)
    assert cache["test_negatives.pt"].shape == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["cache", "ratings.csv"]


@pytest.mark.slow
def test_cache_is_complete_only_with_metadata(tmp_path, run_cli):
    assert not convert.cache_is_complete(tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metadata.json").write_text('{"format_version": ')  # cut short
    assert not convert.cache_is_complete(tmp_path / "partial")
    run_convert(write_ml20m(tmp_path), tmp_path / "cache", "--min_ratings", 2, "--negatives", 2)
    assert convert.cache_is_complete(tmp_path / "cache")
    assert run_cli(["convert.py", "--check", tmp_path / "cache"]).returncode == 0
    assert run_cli(["convert.py", "--check", tmp_path / "partial"]).returncode == 1


def _bad_input(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_INPUTS = {
    "empty file": ("ratings.csv", "", ["empty"]),
    "header only": ("ratings.csv", "userId,movieId,rating,timestamp\n", ["no rows"]),
    "missing column": ("ratings.csv", "userId,movieId,rating\n1,2,3.0\n", ["timestamp"]),
    "wrong custom columns": ("data.csv", "user,item,time\n1,2,3\n", ["--format", "user_id,item_id,timestamp"]),
    "non-numeric ids": ("ratings.csv", "userId,movieId,rating,timestamp\nalice,2,3.0,4\n", ["integers"]),
    "non-numeric ml-1m ids": ("ratings.dat", "1::x::3::4\n", ["integers"]),
    "no user left": ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n", ["--min_ratings"]),
    "id too large for int64": ("ratings.csv", "userId,movieId,rating,timestamp\n99999999999999999999,2,3.0,4\n",
                               ["64-bit"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, run_cli, assert_user_error, case):
    name, text, words = BAD_INPUTS[case]
    path = _bad_input(tmp_path, name, text)
    result = run_cli(["convert.py", "--path", path, "--output", tmp_path / "out" / "cache"])
    assert_user_error(result, str(path), *words)
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.slow
def test_missing_file(tmp_path, run_cli, assert_user_error):
    result = run_cli(["convert.py", "--path", tmp_path / "nope.csv", "--output", tmp_path / "cache"])
    assert_user_error(result, "nope.csv", "download_dataset.sh")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_more_negatives_than_unseen_items(tmp_path, run_cli, assert_user_error):
    path = write_ml20m(tmp_path)
    result = run_cli(["convert.py", "--path", path, "--output", tmp_path / "cache",
                      "--min_ratings", 2, "--negatives", 3])
    assert_user_error(result, "1 user(s)", "--negatives 3", "smaller --negatives")
    assert os.listdir(tmp_path) == ["ratings.csv"]


@pytest.mark.slow
def test_refuses_to_overwrite_a_folder_that_is_not_a_cache(tmp_path, run_cli, assert_user_error):
    path = write_ml20m(tmp_path)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    result = run_cli(["convert.py", "--path", path, "--output", tmp_path / "precious", "--min_ratings", 2])
    assert_user_error(result, "--output", "not a convert cache")
    assert os.listdir(tmp_path / "precious") == ["notes.txt"]


@pytest.mark.parametrize("high", [5, 2**62])  # packed fast path, and the argsort fallback
def test_stable_order_matches_stable_argsort(high):
    values = np.random.default_rng(0).integers(0, high, size=1000)
    np.testing.assert_array_equal(convert.stable_order(values), np.argsort(values, kind="stable"))


def fails(capsys, argv):
    """convert.main(argv) in-process: exit status 2, one stderr line without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_no_training_pair_left_is_a_clear_error(tmp_path, capsys):
    """Every user's only item becomes their test item: a cache with 0 training pairs is refused here,
    not written for ncf.py to reject."""
    path = _write(tmp_path / "ratings.csv", ["userId,movieId,rating,timestamp",
                                             "1,10,4.0,1", "1,10,5.0,2", "2,11,3.0,1", "3,12,3.0,1"])
    line = fails(capsys, ["--path", path, "--output", tmp_path / "cache", "--min_ratings", 1, "--negatives", 1])
    assert "no training pairs" in line and "3 user(s)" in line and "two distinct items" in line
    assert os.listdir(tmp_path) == ["ratings.csv"]


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("value", [2**63, 10**20])
def test_an_id_too_large_for_int64_is_a_clear_error(tmp_path, capsys, fmt, value):
    rows = [(value if n == 3 else u, i, r, t) for n, (u, i, r, t) in enumerate(ROWS)]
    writer = WRITERS[fmt]
    original = ROWS[:]
    ROWS[:] = rows
    try:
        path = writer(tmp_path)
    finally:
        ROWS[:] = original
    line = fails(capsys, ["--path", path, "--output", tmp_path / "cache", "--min_ratings", 1])
    assert "too large for a 64-bit integer" in line and str(path) in line
    assert not (tmp_path / "cache").exists()


def test_a_negative_seed_is_a_clear_error(tmp_path, capsys):
    line = fails(capsys, ["--path", write_ml20m(tmp_path), "--output", tmp_path / "cache", "--seed", -1])
    assert "--seed -1" in line


# At the defaults (--min_ratings 20, --negatives 100), with many users.


def assert_distinct_unseen_negatives(cache, negatives):
    """Every user's row of test negatives: `negatives` distinct items, none a positive of that user."""
    rows = cache["test_negatives.pt"].long().numpy()
    num_users, num_items = len(cache["user_ids.pt"]), len(cache["item_ids.pt"])
    assert rows.shape == (num_users, negatives)
    assert rows.min() >= 0 and rows.max() < num_items
    ordered = np.sort(rows, axis=1)
    assert (ordered[:, 1:] != ordered[:, :-1]).all(), "a user has a repeated negative"
    positives = torch.cat([cache["train_ratings.pt"], cache["test_ratings.pt"]]).long().numpy()
    positive_keys = positives[:, 0] * num_items + positives[:, 1]
    negative_keys = np.arange(num_users)[:, None] * num_items + rows
    assert not np.isin(negative_keys, positive_keys).any(), "a negative is a positive of its user"


def defaults_file(path, seed=0):
    """520 users of 400 items: 500 with 20 to 60 ratings, 20 with 250 to 300 (fewer than 200 unseen items,
    so the complement sampler serves them), one with 19 ratings of items nobody else has, one with 20, and
    one with 20 rows of 19 distinct items."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]

    def add(user, items):
        lines.extend(f"{user},{item},{t}" for t, item in enumerate(items))

    for user in range(500):
        add(user, rng.choice(400, size=rng.integers(20, 61), replace=False))
    for user in range(500, 520):
        add(user, rng.choice(400, size=rng.integers(250, 301), replace=False))
    add(1019, range(9000, 9019))  # 19 ratings: dropped, and its 19 items with it
    add(1020, rng.choice(400, size=20, replace=False))
    nineteen = rng.choice(400, size=19, replace=False)
    add(1021, [*nineteen, nineteen[0]])  # 20 before de-duplication, 19 after
    return _write(path, lines)


def test_the_defaults_keep_20_ratings_drop_19_and_draw_100_distinct_unseen_negatives(tmp_path, monkeypatch):
    path = defaults_file(tmp_path / "interactions.csv")
    used = []
    real = convert.sample_from_complement
    monkeypatch.setattr(convert, "sample_from_complement", lambda users, *a: used.append(len(users)) or real(users, *a))
    convert.main(["--path", str(path), "--output", str(tmp_path / "cache"), "--no_progress"])  # no other flag
    cache = {name: torch.load(tmp_path / "cache" / name, weights_only=True) for name in TENSOR_FILES}
    metadata = load_metadata(tmp_path / "cache")
    assert (metadata["min_ratings"], metadata["negatives"]) == (20, 100)
    user_ids = cache["user_ids.pt"].tolist()
    assert 1019 not in user_ids and 1020 in user_ids and 1021 in user_ids
    assert len(user_ids) == 522 == metadata["num_users"]
    pairs = torch.cat([cache["train_ratings.pt"], cache["test_ratings.pt"]])
    assert (pairs[:, 0] == user_ids.index(1021)).sum().item() == 19
    assert not set(range(9000, 9019)) & set(cache["item_ids.pt"].tolist())
    assert metadata["num_items"] == 400
    assert_distinct_unseen_negatives(cache, 100)
    assert used == [20]  # the heavy users went through the complement sampler, the others by rejection


def dense_file(path, users=60, items=150, seed=1):
    """Every user has 20 to 50 of 150 items: fewer than 2 x 100 unseen, so all go to the complement sampler."""
    rng = np.random.default_rng(seed)
    lines = ["user_id,item_id,timestamp"]
    for user in range(users):
        lines.extend(f"{user},{item},{t}" for t, item in enumerate(rng.choice(items, rng.integers(20, 51), False)))
    return _write(path, lines)


def test_complement_sampling_in_several_chunks_gives_the_unchunked_negatives(tmp_path, monkeypatch):
    path = dense_file(tmp_path / "dense.csv")
    whole = run_convert(path, tmp_path / "whole")  # 60 users x 150 items: one chunk
    chunks = []
    real = convert.segment_positions  # called once per chunk
    monkeypatch.setattr(convert, "segment_positions", lambda lo, hi: chunks.append(len(lo)) or real(lo, hi))
    monkeypatch.setattr(convert, "COMPLEMENT_CHUNK_CELLS", 150 * 7)  # 7 users a chunk
    chunked = run_convert(path, tmp_path / "chunked")
    assert chunks == [7] * 8 + [4]  # several chunks, the last one partial
    assert_distinct_unseen_negatives(chunked, 100)
    # The generator hands out the same numbers in chunks as in one draw: the same negatives.
    assert torch.equal(chunked["test_negatives.pt"], whole["test_negatives.pt"])
