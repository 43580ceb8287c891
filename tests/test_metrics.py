"""HR@k / NDCG@k on hand-computed cases, ties counted against the model."""
import math

import pytest
import torch

from metrics import UNRANKED, full_ranks, rank_metric_sums, sampled_ranks


def sampled(scores, k):
    sums = rank_metric_sums(sampled_ranks(torch.tensor(scores)), k)
    n = len(scores)
    return sums["hr"].item() / n, sums["ndcg"].item() / n


def test_ranks_count_greater_or_equal_negatives():
    scores = torch.tensor([[5.0, 1.0, 2.0, 3.0], [2.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert sampled_ranks(scores).tolist() == [0, 2, 3]


def test_hand_computed_hr_and_ndcg():
    # ranks 0, 1 and 3 with k = 2: hits for the first two only.
    scores = [[9.0, 1.0, 2.0, 3.0], [5.0, 6.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]]
    hr, ndcg = sampled(scores, k=2)
    assert hr == pytest.approx(2 / 3)
    assert ndcg == pytest.approx((1 / math.log2(2) + 1 / math.log2(3)) / 3)


def test_constant_model_never_hits():
    scores = [[0.5] * 101 for _ in range(7)]
    assert sampled(scores, k=10) == (0.0, 0.0)
    assert sampled(scores, k=100) == (0.0, 0.0)  # rank 100 is not < 100
    assert sampled(scores, k=101) == (1.0, pytest.approx(1 / math.log2(102)))


def test_ties_with_some_negatives_push_the_rank_down():
    # The positive ties with 2 negatives and beats 7: rank 2, a hit at k=3, a miss at k=2.
    scores = [[1.0, 1.0, 1.0] + [0.0] * 7]
    assert sampled(scores, k=2) == (0.0, 0.0)
    assert sampled(scores, k=3) == (1.0, pytest.approx(1 / math.log2(4)))


@pytest.mark.parametrize("k, expected_hr", [(1, 1 / 4), (2, 2 / 4), (3, 3 / 4), (5, 1.0)])
def test_k_other_than_ten(k, expected_hr):
    # Ranks 0, 1, 2, 3 for the four users.
    scores = [[4.0, 3.0, 2.0, 1.0, 0.0], [3.5, 4.0, 2.0, 1.0, 0.0],
              [2.5, 4.0, 3.0, 1.0, 0.0], [1.5, 4.0, 3.0, 2.0, 0.0]]
    hr, ndcg = sampled(scores, k)
    assert hr == pytest.approx(expected_hr)
    assert ndcg == pytest.approx(sum(1 / math.log2(r + 2) for r in range(min(k, 4))) / 4)


def test_full_ranks_exclude_training_items_and_count_ties():
    # 2 users x 5 items. User 0: positive item 1 (score 3), trains on item 0 (score 9, excluded),
    # item 3 ties (counts), item 4 is higher (counts): rank 2.
    # User 1: positive item 4 (score 1), trains on items 2 and 3; items 0, 1 lower: rank 0.
    scores = torch.tensor([[9.0, 3.0, 1.0, 3.0, 4.0], [0.0, 0.5, 7.0, 7.0, 1.0]])
    ranks = full_ranks(scores, torch.tensor([1, 4]), torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3]))
    assert ranks.tolist() == [2, 0]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_positive_is_never_a_hit(bad):
    scores = torch.tensor([[bad, 0.0, -1.0], [bad, bad, bad], [1.0, 0.0, -1.0]])
    assert sampled_ranks(scores).tolist() == [UNRANKED, UNRANKED, 0]
    assert sampled(scores.tolist(), k=3) == (pytest.approx(1 / 3), pytest.approx(1 / 3))  # k = every candidate


@pytest.mark.parametrize("bad", [NAN, INF])
def test_a_non_finite_negative_ranks_last(bad):
    scores = torch.tensor([[1.0, bad, 2.0, bad]])
    assert sampled_ranks(scores).tolist() == [1]


def test_a_model_of_nans_scores_zero_not_one():
    assert sampled([[NAN] * 101 for _ in range(5)], k=10) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_full_ranks_of_non_finite_scores(bad):
    # User 0's positive is non-finite: ranked last, beyond every item. User 1's positive (item 0) is
    # finite and only item 2 (finite, higher) beats it; the non-finite item 1 does not.
    scores = torch.tensor([[bad, 1.0, 2.0], [1.0, bad, 3.0]])
    ranks = full_ranks(scores, torch.tensor([0, 0]), torch.tensor([], dtype=torch.long),
                       torch.tensor([], dtype=torch.long))
    assert ranks.tolist() == [UNRANKED, 1]
    sums = rank_metric_sums(ranks, 10)  # more than the items
    assert sums["hr"].item() == 1 and sums["ndcg"].item() <= 1.0 and sums["mrr"].item() == 0.5


def test_a_recipe_protocol_row_counts_each_negative_item_once_and_never_the_test_item():
    """The recipe's negatives repeat items and may hold the test item; its dup_mask counts an item's first
    appearance only. Row: test item 5, negatives 5 (the test item again), 7, 7, 9."""
    from dataloading import first_appearances

    candidates = torch.tensor([[5, 5, 7, 7, 9], [1, 2, 3, 4, 6]])
    assert first_appearances(candidates).tolist() == [[True, False, True, False, True], [True] * 5]
    scores = torch.tensor([[0.5, 0.5, 0.9, 0.9, 0.1], [0.5, 0.9, 0.9, 0.1, 0.2]])
    counted = first_appearances(candidates)[:, 1:]
    assert sampled_ranks(scores).tolist() == [3, 2]  # unmasked: the tie with itself and 7 twice count against it
    assert sampled_ranks(scores, counted).tolist() == [1, 2]  # masked: 7 once; a distinct row is unchanged


def test_mrr_by_hand_with_ties_and_non_finite_scores():
    """MRR@k = 1 / (rank + 1) for a hit (RecBole's), 0 beyond k; ties count against the model, and a
    non-finite score is never a hit nor outranks the positive."""
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1],  # beaten by 0.9 and the tie: rank 2, MRR 1/3
                           [float("nan"), 0.1, 0.2, 0.3],  # a NaN positive: never a hit
                           [0.9, float("nan"), 0.1, 0.2],  # a NaN candidate does not count: rank 0, MRR 1
                           [0.1, 0.2, 0.3, 0.4]])  # rank 3: beyond k = 3
    sums = rank_metric_sums(sampled_ranks(scores), 3)
    assert sums["mrr"].item() == pytest.approx(1 / 3 + 1)
    assert sums["hr"].item() == 2
    # Full ranking: item 1 (0.9) is a training item and is excluded, item 2 ties: rank 1, MRR 1/2.
    ranks = full_ranks(torch.tensor([[0.5, 0.9, 0.5, 0.1]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    assert rank_metric_sums(ranks, 3)["mrr"].item() == pytest.approx(0.5)
