"""synthetic.py: MovieLens-shaped output whose planted structure is real."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from helpers import load_benchmark, make_tiny_cache

import synthetic
from dataloading import load_cache

USERS, ITEMS = 2000, 1000


@pytest.fixture(scope="module")
def ratings():
    return synthetic.generate_ratings(users=USERS, items=ITEMS, seed=0)


def test_shape_like_movielens(ratings):
    assert list(ratings.columns) == ["userId", "movieId", "rating", "timestamp"]
    per_user = ratings.groupby("userId").size()
    assert sorted(per_user.index) == list(range(1, USERS + 1))
    assert per_user.min() >= 20
    assert 45 <= per_user.mean() <= 55  # the default mean is 50
    assert not ratings.duplicated(["userId", "movieId"]).any()  # drawn without replacement
    assert ratings.movieId.max() > ratings.movieId.nunique()  # gaps, so id maps are exercised
    assert ratings.rating.between(0.5, 5.0).all()
    # Timestamps are distinct within a user, so each user's latest item is well defined.
    assert not ratings.duplicated(["userId", "timestamp"]).any()


def test_same_seed_same_data_other_seed_other_data():
    first = synthetic.generate_ratings(users=100, items=200, seed=3)
    pd.testing.assert_frame_equal(first, synthetic.generate_ratings(users=100, items=200, seed=3))
    assert not first.equals(synthetic.generate_ratings(users=100, items=200, seed=4))


def test_item_popularity_is_long_tailed(ratings):
    counts = np.sort(ratings.movieId.value_counts().to_numpy())[::-1]
    share = counts.cumsum() / counts.sum()
    assert share[ITEMS // 10 - 1] > 0.25  # top 10% of items: well above their 10% under uniform
    assert share[ITEMS // 2 - 1] > 0.75  # the bottom half shares less than a quarter
    assert counts[0] > 10 * np.median(counts)


def test_last_items_follow_planted_preferences_more_than_popularity(ratings):
    """HR@10 of the planted score vs item popularity for each user's latest item, unseen items only."""
    model = synthetic.planted_model(USERS, ITEMS)
    user = ratings.userId.to_numpy() - 1
    item = np.searchsorted(model.movie_ids, ratings.movieId.to_numpy())
    last = pd.DataFrame({"user": user, "item": item, "t": ratings.timestamp}).sort_values("t")
    last = last.groupby("user").item.last().sort_index().to_numpy()
    earlier = np.zeros((USERS, ITEMS), dtype=bool)
    earlier[user, item] = True
    earlier[np.arange(USERS), last] = False

    def hit_rate_at_10(scores):
        scores = np.where(earlier, -np.inf, scores)
        rank = (scores > scores[np.arange(USERS), last][:, None]).sum(axis=1)
        return (rank < 10).mean()

    popularity = np.bincount(item, minlength=ITEMS).astype(np.float64)
    planted = hit_rate_at_10(model.scores(np.arange(USERS)))
    by_popularity = hit_rate_at_10(np.broadcast_to(popularity, (USERS, ITEMS)))
    assert planted > by_popularity + 0.15, (planted, by_popularity)
    assert planted > 3 * by_popularity, (planted, by_popularity)


@pytest.mark.slow
def test_command_line_writes_the_csv(tmp_path, run_cli):
    out = tmp_path / "synthetic" / "ratings.csv"
    result = run_cli(["synthetic.py", "--output", out, "--users", 50, "--items", 200, "--seed", 1])
    assert result.returncode == 0, result.stderr
    written = pd.read_csv(out)
    pd.testing.assert_frame_equal(written, synthetic.generate_ratings(users=50, items=200, seed=1))
    assert [p.name for p in out.parent.iterdir()] == ["ratings.csv"]  # no temp file left


@pytest.mark.slow
def test_command_line_rejects_impossible_sizes(tmp_path, run_cli, assert_user_error):
    out = tmp_path / "ratings.csv"
    result = run_cli(["synthetic.py", "--output", out, "--items", 30])
    assert_user_error(result, "--items 30")
    result = run_cli(["synthetic.py", "--output", out, "--items", 100, "--interactions_per_user_mean", 60])
    assert_user_error(result, "--interactions_per_user_mean")
    assert not out.exists()


def test_top_k_per_row_is_exact():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((6, 500)).astype(np.float32)
    counts = np.array([1, 20, 33, 250, 499, 500])  # the last rows exceed any sampled cut-off
    expected = np.concatenate([np.argsort(-row)[:k] for row, k in zip(values, counts, strict=True)])
    np.testing.assert_array_equal(synthetic.top_k_per_row(values, counts), expected)


def test_ratings_sha256_is_that_of_the_written_file(tmp_path):
    path = tmp_path / "ratings.csv"
    synthetic.write_ratings_csv(path, users=50, items=100, interactions_per_user_mean=25, seed=3)
    assert synthetic.ratings_sha256(50, 100, 25, 8, 3) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert synthetic.ratings_sha256(50, 100, 25, 8, 3, (2.0, 0.8)) != hashlib.sha256(path.read_bytes()).hexdigest()


def test_planted_ceiling_ranks_by_the_generating_logits(tmp_path, capsys):
    """The planted model's HR@10/NDCG@10 on the cache's candidates, checked user by user, and well
    above item popularity; flags of another dataset are refused."""
    cache_path = make_tiny_cache(tmp_path, validation=True)
    ceiling = load_benchmark("planted_ceiling")
    shape = ["--users", "300", "--items", "200", "--interactions_per_user_mean", "30"]
    ceiling.main(["--cache", str(cache_path), *shape])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])

    cache = load_cache(cache_path)
    model = synthetic.planted_model(300, 200, 8, 0)
    item_of = {int(movie): index for index, movie in enumerate(model.movie_ids)}
    popularity = np.bincount(cache.train[:, 1].numpy(), minlength=cache.num_items)
    for split, held_out, negatives in (("test", cache.test, cache.test_negatives),
                                       ("valid", cache.valid, cache.valid_negatives)):
        hits, gains, popular_hits, users = 0, 0.0, 0, 0
        for user, positive in held_out.tolist():
            if positive < 0:
                continue
            candidates = [positive, *negatives[user].tolist()]
            logits = model.scores(np.array([int(cache.user_ids[user]) - 1]))[0]
            scores = [logits[item_of[int(cache.item_ids[i])]] for i in candidates]
            rank = sum(s >= scores[0] for s in scores[1:])
            hits += rank < 10
            gains += 1 / np.log2(rank + 2) if rank < 10 else 0.0
            popular_hits += sum(popularity[i] >= popularity[positive] for i in candidates[1:]) < 10
            users += 1
        assert result[f"{split}_hr"] == pytest.approx(hits / users, abs=1e-12)
        assert result[f"{split}_ndcg"] == pytest.approx(gains / users, rel=1e-9)
        assert hits / users > popular_hits / users + 0.1

    for other in (["--seed", "1"], ["--factors", "9"], ["--preset", "realistic"]):
        with pytest.raises(SystemExit) as refused:
            ceiling.main(["--cache", str(cache_path), *shape, *other])
        assert refused.value.code == 2 and "was not converted from the ratings.csv" in capsys.readouterr().err
