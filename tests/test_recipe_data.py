"""convert.py as a user of NVIDIA's 2019 recipe runs it: its flags and defaults, and its test-negative
protocol (`--negatives_protocol recipe`) reproducing the recipe's sampling rules on a hand-made file."""
import json
import os

import numpy as np
import pytest
import torch
from test_convert import fails, write_ml20m

import convert
from cache_format import TENSOR_FILES

# Dense ids follow file order. Training items are 0, 1 and 3, so the recipe protocol draws from items
# 0..3 (its item range is the largest training item + 1): item 4, only user 1's test item, and item 5,
# only user 2's, are never drawn.
#   user 0: items 0, 1 to train, test item 2 -> may draw 2 (its own test item) and 3
#   user 1: items 3, 0 to train, test item 4 -> may draw 1 and 2
#   user 2: item 5 only, its test item, nothing to train on -> may draw 0..3
HAND_MADE = ["user_id,item_id,timestamp",
             "100,10,1", "100,11,2", "100,12,3",
             "200,13,1", "200,10,2", "200,14,3",
             "300,15,1"]
MAY_DRAW = [{2, 3}, {1, 2}, {0, 1, 2, 3}]
TRAINED = [{0, 1}, {0, 3}, set()]
TEST_ITEMS = [2, 4, 5]


def hand_made(folder):
    path = folder / "interactions.csv"
    path.write_text("\n".join(HAND_MADE) + "\n")
    return path


def convert_to(path, output, *flags):
    convert.main(["--path", str(path), "--output", str(output), "--no_progress", *map(str, flags)])
    tensors = {name: torch.load(output / name, weights_only=True) for name in TENSOR_FILES}
    return tensors, json.loads((output / "metadata.json").read_text())


def recipe_negatives(path, output, negatives, seed):
    tensors, _ = convert_to(path, output, "--min_ratings", 1, "--negatives_protocol", "recipe",
                            "--valid_negative", negatives, "-s", seed)
    return tensors["test_negatives.pt"].tolist()


# ---- the recipe's flags and defaults ----------------------------------------------------------------------


def test_the_recipes_flags_mean_what_they_mean_there(tmp_path):
    path = write_ml20m(tmp_path)
    recipe, recipe_meta = convert_to(path, tmp_path / "recipe", "--min_ratings", 2, "--valid_negative", 2, "-s", 7)
    ours, _ = convert_to(path, tmp_path / "ours", "--min_ratings", 2, "--negatives", 2, "--seed", 7)
    assert (recipe_meta["negatives"], recipe_meta["seed"]) == (2, 7)
    assert torch.equal(recipe["test_negatives.pt"], ours["test_negatives.pt"])
    same, _ = convert_to(path, tmp_path / "same", "--min_ratings", 2, "--negatives", 2, "--valid_negative", 2)
    assert same["test_negatives.pt"].shape == (3, 2)  # one setting given twice with one value is fine


def test_the_defaults_are_the_recipes(tmp_path, monkeypatch):
    """No flag at all: --path $DATA_DIR/ml-20m/ratings.csv (the recipe's /data/ml-20m/ratings.csv in the
    image), 100 negatives, seed 1, the exact protocol; the cache lands in $DATA_DIR/cache/ml-20m."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    args = convert.parse_args([])
    assert (args.path, args.output) == (str(tmp_path / "data" / "ml-20m" / "ratings.csv"),
                                        str(tmp_path / "data" / "cache" / "ml-20m"))
    assert (args.negatives, args.seed, args.negatives_protocol, args.path_given) == (100, 1, "exact", False)
    (tmp_path / "data" / "ml-20m").mkdir(parents=True)
    path = write_ml20m(tmp_path / "data" / "ml-20m")
    convert.main(["--min_ratings", "2", "--negatives", "2", "--no_progress"])  # no --path, no --output
    metadata = json.loads((tmp_path / "data" / "cache" / "ml-20m" / "metadata.json").read_text())
    assert metadata["source_sha256"] == convert.sha256_of(path)
    assert (metadata["seed"], metadata["negatives_protocol"]) == (1, "exact")


def test_seed_1_is_the_default_and_0_is_another_draw(tmp_path):
    path = write_ml20m(tmp_path)
    flags = ("--min_ratings", 1, "--negatives", 1)
    default, _ = convert_to(path, tmp_path / "default", *flags)
    one, _ = convert_to(path, tmp_path / "one", *flags, "-s", 1)
    zero, _ = convert_to(path, tmp_path / "zero", *flags, "-s", 0)
    assert torch.equal(default["test_negatives.pt"], one["test_negatives.pt"])
    assert not torch.equal(default["test_negatives.pt"], zero["test_negatives.pt"])


# ---- the recipe's test negatives -------------------------------------------------------------------------


def test_the_recipe_protocol_follows_the_recipes_rules_on_a_hand_made_file(tmp_path, capsys):
    """With replacement, only training items excluded: the test item can be drawn, items repeat, a training
    item never comes, nor an item above the largest training item id. The exact protocol refuses the same
    request (user 0 has only 2 items it never saw), and stays the default."""
    path = hand_made(tmp_path)
    rows = [recipe_negatives(path, tmp_path / f"seed{seed}", 4, seed) for seed in range(40)]
    for draw in rows:
        for user, row in enumerate(draw):
            assert set(row) <= MAY_DRAW[user], (user, row)
            assert not set(row) & TRAINED[user]
    assert all(len(set(draw[0])) < 4 for draw in rows)  # 4 draws of 2 items: repeats every time
    assert any(TEST_ITEMS[0] in draw[0] for draw in rows)  # user 0's test item among its negatives
    assert any(len(set(draw[2])) < 4 for draw in rows)  # repeats also where 4 items are open
    exact = tmp_path / "exact"
    assert "--negatives 4" in fails(capsys, ["--path", path, "--output", exact, "--min_ratings", 1, "--negatives", 4])
    _, metadata = convert_to(path, exact, "--min_ratings", 1, "--negatives", 2)
    assert metadata["negatives_protocol"] == "exact"


def test_each_recipe_draw_is_uniform_over_the_items_it_may_draw():
    """The hand-made file's training pairs (key = user * 6 + item), 2,000 seeds of 4 draws per user."""
    train_keys = np.array([0 * 6 + 0, 0 * 6 + 1, 1 * 6 + 0, 1 * 6 + 3])
    counts = np.zeros((3, 6))
    for seed in range(2000):
        for user, row in enumerate(convert.sample_recipe_negatives(train_keys, 3, 6, 4, seed)):
            np.add.at(counts[user], row, 1)
    for user, items in enumerate(MAY_DRAW):
        share = counts[user] / counts[user].sum()
        assert share[sorted(set(range(6)) - items)].sum() == 0
        assert np.all(np.abs(share[sorted(items)] - 1 / len(items)) < 0.025), (user, share)  # ~4 sigma


def test_recipe_draws_repeat_and_hit_the_test_item_as_often_as_independent_draws_would(tmp_path):
    """Many users: the share of test items among their own negatives, and the number of distinct items a
    row holds, match draws with replacement from each user's open items (training items excluded)."""
    rng = np.random.default_rng(5)
    lines = ["user_id,item_id,timestamp"]
    for user in range(400):
        lines += [f"{user},{item},{t}" for t, item in enumerate(rng.choice(30, rng.integers(5, 25), replace=False))]
    (tmp_path / "many.csv").write_text("\n".join(lines) + "\n")
    tensors, _ = convert_to(tmp_path / "many.csv", tmp_path / "c", "--min_ratings", 1, "--negatives_protocol",
                            "recipe", "--negatives", 20)
    negatives = tensors["test_negatives.pt"].numpy()
    train, test = tensors["train_ratings.pt"].numpy(), tensors["test_ratings.pt"].numpy()
    span = train[:, 1].max() + 1
    open_items = span - np.bincount(train[:, 0], minlength=len(test))
    trained = np.zeros((len(test), len(tensors["item_ids.pt"])), dtype=bool)
    trained[train[:, 0], train[:, 1]] = True
    assert not np.take_along_axis(trained, negatives.astype(np.int64), axis=1).any()
    assert negatives.max() < span
    hits = (negatives == test[:, 1:2]).any(axis=1).mean()
    assert hits == pytest.approx((1 - (1 - 1 / open_items) ** 20).mean(), abs=0.05)
    distinct = np.array([len(set(row)) for row in negatives]).mean()
    assert distinct == pytest.approx((open_items * (1 - (1 - 1 / open_items) ** 20)).mean(), rel=0.03)


def test_the_nth_untrained_item_is_counted_right(tmp_path):
    """The vectorised rank-to-item map against a plain count, on random users of every density."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        users, items = int(rng.integers(1, 6)), int(rng.integers(2, 12))
        pairs = sorted({u * items + int(i) for u in range(users)
                        for i in rng.choice(items, size=rng.integers(0, items), replace=False)})
        if not pairs:
            continue
        train_users, train_items = np.divmod(np.array(pairs), items)
        span, per_user = int(train_items.max()) + 1, np.bincount(train_users, minlength=users)
        width = span - int(per_user.min())
        rank = np.minimum(np.arange(width)[None, :], np.maximum(span - per_user - 1, 0)[:, None])
        got = convert.nth_untrained_item(train_users, train_items, per_user, span, rank)
        for user in range(users):
            allowed = [i for i in range(span) if user * items + i not in pairs]
            if allowed:
                assert got[user].tolist() == [allowed[r] for r in rank[user]], (user, allowed)


def test_a_recipe_cache_records_its_protocol_and_loads(tmp_path):
    from dataloading import TestData, first_appearances, load_cache

    tensors, metadata = convert_to(hand_made(tmp_path), tmp_path / "c", "--min_ratings", 1,
                                   "--negatives_protocol", "recipe", "--negatives", 3)
    assert (metadata["negatives_protocol"], metadata["negatives"], metadata["seed"]) == ("recipe", 3, 1)
    assert convert.cache_is_complete(tmp_path / "c")
    cache = load_cache(str(tmp_path / "c"))
    assert torch.equal(cache.test_negatives, tensors["test_negatives.pt"])
    # Evaluated as the recipe evaluates it: an item's first appearance among the candidates counts, once.
    data = TestData.from_cache(cache, torch.device("cpu"))
    assert torch.equal(data.counted, first_appearances(data.candidates)[:, 1:])
    convert_to(hand_made(tmp_path), tmp_path / "exact", "--min_ratings", 1, "--negatives", 3)
    exact = TestData.from_cache(load_cache(str(tmp_path / "exact")), torch.device("cpu"))
    assert exact.counted is None  # the exact protocol's negatives are distinct and never the test item


# ---- --check with --path: the cache of that file, with that split ----------------------------------------


def check(*argv):
    with pytest.raises(SystemExit) as exit_info:
        convert.main([str(a) for a in argv])
    return exit_info.value.code


def test_check_with_path_wants_the_cache_of_that_file_and_split(tmp_path, capsys):
    path = write_ml20m(tmp_path)
    other = hand_made(tmp_path)
    convert_to(path, tmp_path / "c", "--min_ratings", 2, "--negatives", 2)
    assert check("--check", tmp_path / "c") == 0
    assert check("--check", tmp_path / "c", "--path", path) == 0
    assert check("--check", tmp_path / "c", "--path", other) == 1
    assert "another file" in capsys.readouterr().out
    assert check("--check", tmp_path / "c", "--path", path, "--validation") == 1
    assert "without --validation" in capsys.readouterr().out
    os.remove(path)  # a cache outlives its download: the file is compared only while it is there
    assert check("--check", tmp_path / "c", "--path", path) == 0


# ---- hostile values: one stderr line, exit status 2, nothing written ------------------------------------

BAD_FLAGS = {
    "negatives not a number": (["--valid_negative", "abc"], "invalid int value"),
    "negatives empty": (["--valid_negative", ""], "invalid int value"),
    "negatives zero": (["--valid_negative", "0"], "from 1 to"),
    "negatives negative": (["--valid_negative", "-5"], "from 1 to"),
    "negatives NaN": (["--valid_negative", "nan"], "invalid int value"),
    "negatives inf": (["--negatives", "inf"], "invalid int value"),
    "negatives fraction": (["--valid_negative", "1.5"], "invalid int value"),
    "negatives beyond int64": (["--valid_negative", str(2**70)], "from 1 to"),
    "negatives two names disagree": (["--negatives", "5", "--valid_negative", "6"], "disagree"),
    "negatives twice": (["--valid_negative", "2", "--valid_negative", "3"], "disagree"),
    "seed not a number": (["-s", "abc"], "invalid int value"),
    "seed empty": (["-s", ""], "invalid int value"),
    "seed negative": (["-s", "-1"], "--seed -1"),
    "seed NaN": (["--seed", "nan"], "invalid int value"),
    "seed both forms disagree": (["-s", "1", "--seed", "2"], "disagree"),
    "protocol unknown": (["--negatives_protocol", "mlperf"], "invalid choice"),
    "protocol empty": (["--negatives_protocol", ""], "invalid choice"),
    "protocol twice": (["--negatives_protocol", "recipe", "--negatives_protocol", "exact"], "disagree"),
    "protocol recipe with validation": (["--negatives_protocol", "recipe", "--validation"], "no validation split"),
    "recipe: more negatives than items": (["--negatives_protocol", "recipe", "--negatives", "7"], "than the 5 items"),
    "path empty": (["--path", ""], "must not be empty"),
    "output empty": (["--output", ""], "must not be empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_a_bad_new_flag_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, case):
    flags, words = BAD_FLAGS[case]
    path = write_ml20m(tmp_path)
    argv = ["--path", path, "--output", tmp_path / "cache", "--min_ratings", 1, "--no_progress", *flags]
    line = fails(capsys, argv)
    assert words in line, line
    assert sorted(os.listdir(tmp_path)) == ["ratings.csv"]


def test_a_user_who_trained_on_every_item_has_nothing_for_the_recipe_to_draw(tmp_path, capsys):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,10,1.0,1\n1,11,1.0,2\n1,12,1.0,3\n2,10,1.0,1\n2,12,1.0,2\n")
    line = fails(capsys, ["--path", path, "--output", tmp_path / "cache", "--min_ratings", 1,
                          "--negatives_protocol", "recipe", "--negatives", 1])
    assert "1 user(s) trained on every one of the 2 items" in line
    assert sorted(os.listdir(tmp_path)) == ["ratings.csv"]


@pytest.mark.slow
def test_conflicting_names_on_the_real_command_line(tmp_path, run_cli, assert_user_error):
    path = write_ml20m(tmp_path)
    result = run_cli(["convert.py", "--path", path, "--output", tmp_path / "cache", "--negatives", "50",
                      "--valid_negative", "60"])
    assert_user_error(result, "--negatives 50", "--valid_negative 60", "disagree")
    assert sorted(os.listdir(tmp_path)) == ["ratings.csv"]
