"""Top-k ranking metrics by name (HR@k, NDCG@k, MRR@k) from candidate scores, and the item-popularity baseline.

A positive's rank is the number of OTHER candidates scored greater than or equal to it: ties count
against the model, so a model that scores every item the same has rank = #candidates - 1 and never
hits (the recipe's strict `>` would let a constant model hit every time).

A non-finite score (NaN or +-inf, from a diverged model) ranks last: a non-finite positive is never a
hit, and a non-finite candidate never outranks the positive. NaN compares false to everything, so
without this rule a model of NaNs would score HR@10 = 1.
"""
import torch

UNRANKED = 2**62  # the rank of a non-finite positive: below every candidate, a miss at any k


# Each metric of a user's 0-based rank (float64), 0 beyond the cut-off k. Evaluation, the all-reduce, the logs
# and the plots iterate over these names (logger.METRIC_LABELS gives each its printed label).
METRICS = {
    "hr": lambda rank, k: (rank < k).double(),
    "ndcg": lambda rank, k: torch.where(rank < k, 1.0 / torch.log2(rank.double() + 2.0), 0.0),
    "mrr": lambda rank, k: torch.where(rank < k, 1.0 / (rank.double() + 1.0), 0.0),  # RecBole's MRR@k
}


def rank_metric_sums(rank, k):
    """{metric name: its sum over the users whose ranks are given} (float64 device tensors, no host sync)."""
    return {name: metric(rank, k).sum() for name, metric in METRICS.items()}


def candidate_loss_sum(logits):
    """The recipe's validation loss, summed: the binary cross-entropy of logits [users, candidates] against
    label 1 for column 0 (the held-out item) and 0 for the others, every candidate counted (a recipe-protocol
    cache's repeated negatives too, as the recipe's mean over its evaluation batches counts them)."""
    logits = logits.float()
    return torch.nn.functional.softplus(-logits[:, 0]).sum(dtype=torch.float64) + \
        torch.nn.functional.softplus(logits[:, 1:]).sum(dtype=torch.float64)


def sampled_ranks(scores, counted=None):
    """Ranks of column 0 of `scores` [users, candidates] among the other columns (those `counted` [users,
    candidates - 1] marks, when given: a recipe-protocol cache's repeated negatives count once)."""
    positive, others = scores[:, :1], scores[:, 1:]
    beats = (others >= positive) & others.isfinite()
    beaten_by = (beats if counted is None else beats & counted).sum(dim=1)
    return torch.where(positive.squeeze(1).isfinite(), beaten_by, UNRANKED)


def full_ranks(scores, positive_items, excluded_rows, excluded_items):
    """Ranks of each user's positive among all items not excluded (the user's training items).

    scores: [users, items], overwritten when float32 (callers pass a fresh tensor); positive_items:
    [users]; excluded (row, item) pairs are set to -inf so they never outrank the positive. The
    positive itself is removed from the count.
    """
    scores = scores.float().contiguous()
    positive = scores.gather(1, positive_items.long().unsqueeze(1))
    # index_fill_ takes the value as a host number: no device scalar, no sync.
    scores.view(-1).index_fill_(0, excluded_rows.long() * scores.shape[1] + excluded_items.long(), float("-inf"))
    beaten_by = ((scores >= positive) & scores.isfinite()).sum(dim=1) - 1  # the positive ties with itself
    return torch.where(positive.squeeze(1).isfinite(), beaten_by, UNRANKED)


class ItemPopularity(torch.nn.Module):
    """Baseline that scores every item by its number of training positives, whoever the user is.

    Scored by the same evaluation code as NeuMF, it is the bar a trained model must clearly clear.
    """

    def __init__(self, train_items, nb_items):
        super().__init__()
        self.register_buffer("counts", torch.bincount(train_items.long(), minlength=nb_items).float())

    def forward(self, user, item):
        return self.counts[item.long()]
