"""Property-based tests (hypothesis) of convert's protocol and of the ranking metrics."""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
from cache_format import TENSOR_FILES
from metrics import rank_metric_sums, sampled_ranks


@st.composite
def valid_tables(draw):
    """(rows, min_ratings, negatives): a random ratings table that convert must accept.

    Valid by construction, so no example is thrown away: users A and B between them see every item of
    the catalogue while each leaves at least `negatives` unseen; other kept users see any set that
    leaves that many; dropped users have fewer than min_ratings rows, of any items (also ones nobody
    else has). Rows repeat pairs, share timestamps and come in random file order; ids are arbitrary.
    """
    negatives = draw(st.integers(1, 10))
    min_ratings = draw(st.integers(1, 4))
    num_items = draw(st.integers(2 * negatives + 1, 2 * negatives + 8))

    def some_items(among, most, least=1):
        return sorted(draw(st.permutations(among))[: draw(st.integers(least, most))])

    a_items = some_items(range(num_items), num_items - negatives, least=negatives + 1)
    shared = some_items(a_items, len(a_items) - negatives, least=0)
    histories = [a_items, sorted(set(range(num_items)) - set(a_items) | set(shared))]  # A and B: every item
    for _ in range(draw(st.integers(0, 4))):
        histories.append(some_items(range(num_items), num_items - negatives))
    kept = len(histories)
    if min_ratings > 1:
        for _ in range(draw(st.integers(0, 3))):
            histories.append(draw(st.lists(st.integers(0, num_items + 3), min_size=1, max_size=min_ratings - 1)))
    # Ids in no particular order, spread over a wide range.
    user_spread, item_spread = draw(st.integers(1, 10**6)), draw(st.integers(1, 10**9))
    user_ids = [1 + k * user_spread for k in draw(st.permutations(range(len(histories))))]
    item_ids = [1 + k * item_spread for k in draw(st.permutations(range(num_items + 4)))]
    rows = []
    for n, items in enumerate(histories):
        items = list(items)
        if n < kept:  # repeats, at least up to min_ratings rows
            repeats = draw(st.integers(max(0, min_ratings - len(items)), max(0, min_ratings - len(items)) + 3))
            items += [draw(st.sampled_from(histories[n])) for _ in range(repeats)]
        rows += [(user_ids[n], item_ids[i], draw(st.integers(0, 20))) for i in items]
    return draw(st.permutations(rows)), min_ratings, negatives


def run_convert(tmp_path, table, min_ratings, negatives, seed=0):
    csv = tmp_path / "ratings.csv"
    csv.write_text("user_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in table))
    out = tmp_path / "cache"
    args = convert.parse_args(["--path", str(csv), "--output", str(out), "--negatives", str(negatives), "--seed",
                               str(seed), "--min_ratings", str(min_ratings), "--no_progress"])
    convert.convert(args)
    load = lambda name: torch.load(out / name, weights_only=True).numpy()  # noqa: E731
    return {name: load(name) for name in TENSOR_FILES if name.endswith(".pt")}, \
        json.loads((out / "metadata.json").read_text())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=valid_tables())
def test_convert_keeps_the_protocol(tmp_path_factory, example):
    table, min_ratings, negatives = example
    tmp_path = tmp_path_factory.mktemp("prop")
    counts = {}
    for u, _, _ in table:
        counts[u] = counts.get(u, 0) + 1
    kept = [(u, i, t) for u, i, t in table if counts[u] >= min_ratings]
    items_kept = {i for _, i, _ in kept}
    interacted = {}
    for u, i, _ in kept:
        interacted.setdefault(u, set()).add(i)
    cache, meta = run_convert(tmp_path, table, min_ratings, negatives)
    user_ids, item_ids = cache["user_ids.pt"], cache["item_ids.pt"]
    train, test, negs = cache["train_ratings.pt"], cache["test_ratings.pt"], cache["test_negatives.pt"]

    # Counts add up: every kept user once in test, every distinct pair once in train or test.
    assert user_ids.tolist() == list(dict.fromkeys(u for u, _, _ in kept))  # dense ids in file order
    assert item_ids.tolist() == list(dict.fromkeys(i for _, i, _ in kept))
    assert sorted(item_ids.tolist()) == sorted(items_kept)
    assert (meta["min_ratings"], meta["negatives"]) == (min_ratings, negatives)
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
        sums = rank_metric_sums(ranks, k)
        hr, nd = sums["hr"].item() / len(score_rows), sums["ndcg"].item() / len(score_rows)
        assert (hr, nd) == pytest.approx(brute_force(score_rows, k), rel=1e-12)
        assert hr >= previous
        previous = hr
