"""--full_ranking: HR@k / NDCG@k against every item the user has not trained on, checked by brute force.

The brute force is plain Python over a score table: for each user, every item that is not one of
their training items is a candidate; the rank of the test item is the number of OTHER candidates
scored greater than or equal to it (ties count against the model).
"""
import math

import numpy as np
import pytest
import torch
from helpers import run_script
from torch import nn

import ncf
from checkpoint import load_model
from dataloading import Cache, FullRankingData, load_cache
from devices import choose_precision
from logger import read_log
from neumf import build_model

CPU = torch.device("cpu")


def brute_force(scores, train_pairs, test_items, k):
    """(HR@k, NDCG@k) from a [users, items] score table, one user and one item at a time."""
    trained = {(int(u), int(i)) for u, i in train_pairs}
    hits = ndcg = 0.0
    for user, positive in enumerate(test_items):
        positive = int(positive)
        rank = sum(
            1
            for item in range(scores.shape[1])
            if item != positive and (user, item) not in trained and scores[user, item] >= scores[user, positive]
        )
        if rank < k:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    return hits / len(test_items), ndcg / len(test_items)


class TableModel(nn.Module):
    """Scores read from a fixed [users, items] table: known scores, ties included."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))

    def forward(self, user, item):
        return self.table[user.long(), item.long()]


def hand_made_cache(rng, users, items):
    """A Cache held in memory: each user trains on a random subset and tests on one other item."""
    train, test = [], []
    for user in range(users):
        # Some users train on all but one item, so only their test item is left to rank.
        count = items - 1 if user % 5 == 0 else int(rng.integers(1, items - 1))
        chosen = rng.permutation(items)[: count + 1]
        test.append((user, int(chosen[0])))
        train.extend((user, int(item)) for item in sorted(chosen[1:]))
    train = torch.tensor(train, dtype=torch.int32)
    metadata = {"num_users": users, "num_items": items, "num_train": len(train), "negatives": 1}
    return Cache(train=train, test=torch.tensor(test, dtype=torch.int32),
                 test_negatives=torch.zeros(users, 1, dtype=torch.int32),
                 user_ids=torch.arange(users) + 1, item_ids=torch.arange(items) + 1, metadata=metadata)


def evaluate(model, cache, k, valid_batch_size, rank=0, world_size=1):
    data = FullRankingData.from_cache(cache, CPU, rank, world_size)
    ctx = ncf.DistContext(rank=rank, local_rank=rank, world_size=1, device=CPU)
    figures = ncf.evaluate_full_ranking(model, data, k, valid_batch_size, choose_precision("O0", "auto", CPU), ctx)
    return figures["hr"], figures["ndcg"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 10])
def test_matches_brute_force_with_ties_over_several_chunks(seed, k):
    rng = np.random.default_rng(seed)
    users, items = 23, 13
    cache = hand_made_cache(rng, users, items)
    # Scores from 4 levels: ties everywhere, and training items often outscore the test item.
    scores = rng.integers(0, 4, size=(users, items)).astype(np.float32)
    expected = brute_force(scores, cache.train.tolist(), cache.test[:, 1].tolist(), k)
    # 2 * items per batch: 2 users per chunk, 12 chunks, the last one partial.
    hr, ndcg = evaluate(TableModel(scores), cache, k, valid_batch_size=2 * items + 1)
    assert (hr, ndcg) == pytest.approx(expected, abs=1e-12)
    # One chunk for everyone gives the same figures.
    assert evaluate(TableModel(scores), cache, k, valid_batch_size=10**6) == pytest.approx(expected, abs=1e-12)


def test_ties_count_against_the_model():
    cache = hand_made_cache(np.random.default_rng(0), 20, 13)
    constant = np.zeros((20, 13), dtype=np.float32)
    # With every score equal, the test item ranks last among the user's untrained items: only the
    # users with at most k untrained items (here the ones who trained on all but one) can hit.
    hr, ndcg = evaluate(TableModel(constant), cache, k=1, valid_batch_size=13)
    assert hr == pytest.approx(4 / 20) and ndcg == pytest.approx(4 / 20)
    assert (hr, ndcg) == pytest.approx(brute_force(constant, cache.train.tolist(), cache.test[:, 1].tolist(), 1))


def test_ranks_of_a_known_table():
    """Two users, five items, figures worked out by hand."""
    train = torch.tensor([[0, 0], [0, 1], [1, 4]], dtype=torch.int32)
    cache = Cache(train=train, test=torch.tensor([[0, 2], [1, 0]], dtype=torch.int32),
                  test_negatives=torch.zeros(2, 1, dtype=torch.int32), user_ids=torch.tensor([7, 9]),
                  item_ids=torch.arange(5), metadata={"num_users": 2, "num_items": 5})
    scores = np.array([[9, 9, 5, 5, 1],  # user 0: trained items 0, 1 excluded; item 3 ties -> rank 1
                       [3, 2, 3, 1, 8]], dtype=np.float32)  # user 1: item 4 excluded; item 2 ties -> rank 1
    hr, ndcg = evaluate(TableModel(scores), cache, k=1, valid_batch_size=5)
    assert (hr, ndcg) == (0.0, 0.0)
    hr, ndcg = evaluate(TableModel(scores), cache, k=2, valid_batch_size=5)
    assert hr == 1.0 and ndcg == pytest.approx(1 / math.log2(3))


def test_rank_shares_add_up_to_the_whole():
    """Each rank ranks its contiguous share of users; the shares' sums are the single-process figures."""
    rng = np.random.default_rng(7)
    cache = hand_made_cache(rng, 31, 17)
    scores = rng.integers(0, 6, size=(31, 17)).astype(np.float32)
    expected = brute_force(scores, cache.train.tolist(), cache.test[:, 1].tolist(), 5)
    sums = np.zeros(2)
    for rank in range(3):
        share = len(torch.tensor_split(torch.arange(31), 3)[rank])
        sums += np.array(evaluate(TableModel(scores), cache, 5, 3 * 17, rank, 3)) * share
    assert tuple(sums / 31) == pytest.approx(expected, abs=1e-12)


@torch.no_grad()
def score_table(model, cache):
    """[users, items] scores of a model, one user at a time."""
    items = torch.arange(cache.num_items)
    return np.stack([model(torch.full_like(items, u), items).numpy() for u in range(cache.num_users)])


def test_trained_model_matches_brute_force(tiny_cache, trained_tiny):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    cache = load_cache(str(cache_dir))
    model, _ = load_model(str(checkpoint), cache, CPU)
    scores = score_table(model, cache)
    expected = brute_force(scores, cache.train.tolist(), cache.test[:, 1].tolist(), 10)
    assert 0.0 < expected[0] < 1.0  # a trained model: some hits, not all
    assert evaluate(model, cache, 10, valid_batch_size=7 * cache.num_items) == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_mode_test_logs_brute_force_figures(tiny_cache, trained_tiny, tmp_path):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    log_path = tmp_path / "test.json"
    run_script("ncf.py", "--data", cache_dir, "--mode", "test", "--load_checkpoint_path", checkpoint,
                  "--full_ranking", "--valid_batch_size", 1000, "--opt_level", "O0", "--log_path", log_path)
    (record,) = [r for r in read_log(log_path) if r["event"] == "test"]

    cache = load_cache(str(cache_dir))
    ckpt = torch.load(checkpoint, weights_only=True)
    model = build_model(ckpt["config"], CPU).eval()
    model.load_state_dict(ckpt["model"])
    scores = score_table(model, cache)
    full_hr, full_ndcg = brute_force(scores, cache.train.tolist(), cache.test[:, 1].tolist(), 10)
    assert record["full_hr"] == pytest.approx(full_hr, abs=1e-12)
    assert record["full_ndcg"] == pytest.approx(full_ndcg, abs=1e-12)
    # Against every untrained item (~170 here) the test item is harder to hit than among 51 candidates.
    assert record["full_hr"] < record["hr"]
    assert record["hr"] == pytest.approx(ckpt["hr"], abs=1e-12)


def test_full_ranking_mrr_matches_brute_force(tiny_cache, trained_tiny):
    """MRR@k against every untrained item: 1 / (rank + 1) for a hit, one user and one item at a time."""
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    cache = load_cache(str(cache_dir))
    model, _ = load_model(str(checkpoint), cache, CPU)
    scores, trained_pairs = score_table(model, cache), {tuple(p) for p in cache.train.tolist()}
    total = 0.0
    for user, positive in enumerate(cache.test[:, 1].tolist()):
        rank = sum(1 for item in range(scores.shape[1]) if item != positive and (user, item) not in trained_pairs
                   and scores[user, item] >= scores[user, positive])
        total += 1 / (rank + 1) if rank < 10 else 0.0
    data = FullRankingData.from_cache(cache, CPU)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    figures = ncf.evaluate_full_ranking(model, data, 10, 7 * cache.num_items, choose_precision("O0", "auto", CPU), ctx)
    assert 0 < figures["mrr"] == pytest.approx(total / cache.num_users, abs=1e-12)
