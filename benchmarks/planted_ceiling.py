"""The HR@k and NDCG@k of the model that generated a synthetic dataset: what no trained model can beat.

    python synthetic.py --preset realistic --output runs/realistic/ratings.csv
    python convert.py --path runs/realistic/ratings.csv --output runs/realistic/cache --validation
    python benchmarks/planted_ceiling.py --cache runs/realistic/cache --preset realistic

synthetic.py draws each user's items from softmax(<p_u, q_i> + log popularity_i); ranking a user's
candidates by those planted logits is the best ranking there is in expectation, so its HR@k on the
cache's own test (and validation) candidates is the ceiling a trained NeuMF is measured against, and
item popularity the floor. The flags after --cache must be those synthetic.py was given: the same
flags give the same planted model, and a cache converted from another ratings.csv (its SHA-256 is in
the cache's metadata) is refused.
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import ArgumentParser, UserError, main_guard  # noqa: E402  (sets OMP_WAIT_POLICY before numpy and torch load)
from logger import format_record  # noqa: E402
from synthetic import add_shape_flags, planted_model, ratings_sha256, resolve_shape  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="convert.py's cache of a synthetic.py ratings.csv")
    parser.add_argument("--topk", type=int, default=10, help="k of HR@k and NDCG@k")
    add_shape_flags(parser)
    return resolve_shape(parser.parse_args(argv))


def check_shape(args, cache):
    """Cheap checks before the planted model is built (its size is the flags'): the flags' sizes must be the
    cache's (every synthetic user keeps at least 20 ratings, so convert.py keeps them all), and k, as in ncf.py,
    at most the candidates per user."""
    if cache.num_users != args.users or cache.num_items > args.items:
        raise UserError(f"--cache {args.cache} has {cache.num_users:,} users and {cache.num_items:,} items, which "
                        f"synthetic.py with {args.users:,} users and {args.items:,} items does not write: pass the "
                        "--preset and sizes it was made with")
    candidates = cache.test_negatives.shape[1] + 1
    if not 1 <= args.topk <= candidates:
        raise UserError(f"--topk must be between 1 and the cache's {candidates} candidates per user, got {args.topk}")


def check_source(args, cache):
    """The cache must come from the ratings.csv these flags write: its SHA-256 is in the metadata."""
    made = ratings_sha256(args.users, args.items, args.interactions_per_user_mean, args.factors, args.seed,
                          (args.strength, args.popularity_exponent))
    if cache.metadata.get("source_sha256") != made:
        raise UserError(f"--cache {args.cache} was not converted from the ratings.csv that synthetic.py writes "
                        "with these flags: pass the --preset, sizes, --factors and --seed it was made with")


def planted_indices(model, cache):
    """The planted model's user and item index of each cache id (the cache keeps the original ids)."""
    users = cache.user_ids.numpy() - 1  # synthetic.py writes userId = index + 1
    return users, np.searchsorted(model.movie_ids, cache.item_ids.numpy())


def planted_figures(model, users, items, positives, negatives, topk):
    """{metric name: mean} of the planted logits, ranked and scored by metrics.py as a trained model is."""
    import torch

    from metrics import rank_metric_sums, sampled_ranks

    scores = model.scores(users[positives[:, 0]])
    rows = np.arange(len(positives))
    candidates = np.concatenate((scores[rows, items[positives[:, 1]]][:, None],
                                 np.take_along_axis(scores, items[negatives], axis=1)), axis=1)
    sums = rank_metric_sums(sampled_ranks(torch.from_numpy(candidates)), topk)
    return {name: total.item() / len(positives) for name, total in sums.items()}


@main_guard
def main(argv=None):
    args = parse_args(argv)
    import dataloading  # torch loads here, after the flags are checked

    cache = dataloading.load_cache(args.cache, flag="--cache")
    check_shape(args, cache)
    model = planted_model(args.users, args.items, args.factors, args.seed, args.strength,
                          args.popularity_exponent)
    check_source(args, cache)
    users, items = planted_indices(model, cache)
    result = {"cache": args.cache, "topk": args.topk}
    splits = [("test", cache.test, cache.test_negatives)]
    if cache.has_validation:
        splits.append(("valid", cache.valid, cache.valid_negatives))
    for name, positives, negatives in splits:
        held = (positives[:, 1] >= 0).numpy()  # a user with too few items has no validation item
        figures = planted_figures(model, users, items, positives.numpy()[held], negatives.numpy()[held], args.topk)
        result.update({f"{name}_{metric}": value for metric, value in figures.items()})
        print(f"planted model, {name}: {format_record(figures, args.topk)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
