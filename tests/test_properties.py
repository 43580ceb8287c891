"""Property-based tests (hypothesis) of convert's protocol and of the ranking metrics."""
import argparse
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
from cache_format import TENSOR_FILES
from metrics import rank_metric_sums, sampled_ranks

# Random small rating tables: (user, item, timestamp) rows with repeated pairs and tied timestamps.
rows = st.lists(
    st.tuples(st.integers(1, 12), st.integers(100, 130), st.integers(0, 20)),
    min_size=1, max_size=120,
)


def run_convert(tmp_path, table, min_ratings, negatives, seed=0):
    csv = tmp_path / "ratings.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in table))
    out = tmp_path / "cache"
    args = argparse.Namespace(path=str(csv), output=str(out), negatives=negatives, seed=seed,
                              min_ratings=min_ratings, format="auto", no_progress=True)
    convert.convert(args)
    load = lambda name: torch.load(out / name, weights_only=True).numpy()  # noqa: E731
    return {name: load(name) for name in TENSOR_FILES if name.endswith(".pt")}, \
        json.loads((out / "metadata.json").read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=rows, min_ratings=st.integers(1, 4), negatives=st.integers(1, 3))
def test_convert_keeps_the_protocol(tmp_path_factory, table, min_ratings, negatives):
    tmp_path = tmp_path_factory.mktemp("prop")
    counts = {}
    for u, _, _ in table:
        counts[u] = counts.get(u, 0) + 1
    kept = [(u, i, t) for u, i, t in table if counts[u] >= min_ratings]
    items_kept = {i for _, i, _ in kept}
    interacted = {}
    for u, i, _ in kept:
        interacted.setdefault(u, set()).add(i)
    if not kept or any(len(items_kept) - len(s) < negatives for s in interacted.values()) \
            or all(len(s) == 1 for s in interacted.values()):
        return  # a user error, covered by the error tests
    cache, meta = run_convert(tmp_path, table, min_ratings, negatives)
    user_ids, item_ids = cache["user_ids.pt"], cache["item_ids.pt"]
    train, test, negs = cache["train_ratings.pt"], cache["test_ratings.pt"], cache["test_negatives.pt"]

    # Counts add up: every kept user once in test, every distinct pair once in train or test.
    assert sorted(user_ids.tolist()) == sorted(interacted)
    assert sorted(item_ids.tolist()) == sorted(items_kept)
    assert meta["num_train"] + meta["num_users"] == sum(len(s) for s in interacted.values())
    assert test[:, 0].tolist() == list(range(len(user_ids)))
    assert train.tolist() == sorted(train.tolist())
    # The protocol, by hand: stable sort by time, keep each pair's first occurrence, last one is the test.
    in_time_order = sorted(kept, key=lambda row: row[2])  # sorted() is stable: ties keep file order
    remaining = {}
    for u, i, _ in in_time_order:
        remaining.setdefault(u, {}).setdefault(i, None)  # dicts keep first-insertion order
    for dense_user, original in enumerate(user_ids.tolist()):
        expected_test = list(remaining[original])[-1]
        assert item_ids[test[dense_user, 1]] == expected_test
        trained = item_ids[train[train[:, 0] == dense_user, 1]].tolist()
        assert sorted(trained) == sorted(set(interacted[original]) - {expected_test})
        negatives_of_user = item_ids[negs[dense_user]].tolist()
        assert len(set(negatives_of_user)) == negatives
        assert not set(negatives_of_user) & interacted[original]


scores = st.lists(st.lists(st.integers(0, 5), min_size=11, max_size=11), min_size=1, max_size=30)


def brute_force(score_rows, k):
    hits = ndcg = 0.0
    for row in score_rows:
        rank = sum(1 for s in row[1:] if s >= row[0])
        if rank < k:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    return hits / len(score_rows), ndcg / len(score_rows)


@settings(max_examples=200, deadline=None)
@given(score_rows=scores)
def test_metrics_equal_brute_force_and_hr_is_monotone_in_k(score_rows):
    ranks = sampled_ranks(torch.tensor(score_rows, dtype=torch.float32))
    previous = -1.0
    for k in range(1, 12):
        hits, ndcg = rank_metric_sums(ranks, k)
        hr, nd = hits.item() / len(score_rows), ndcg.item() / len(score_rows)
        assert (hr, nd) == pytest.approx(brute_force(score_rows, k), rel=1e-12)
        assert hr >= previous
        previous = hr
