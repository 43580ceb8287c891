"""Generate a MovieLens-shaped ratings.csv with planted structure.

    python synthetic.py --output data/synthetic/ratings.csv                  # ~300k rows, seconds
    python synthetic.py --output /tmp/ml1m/ratings.csv --preset ml-1m        # 6,040 x 3,706, ~1M rows
    python synthetic.py --output /tmp/ml20m/ratings.csv --preset ml-20m      # 138,493 x 26,744, ~20M rows

Each user u and item i have latent factors; item i also has a long-tailed (Zipf) popularity. User u's
score for item i is strength * <p_u, q_i> + log popularity_i, and u's items are drawn from
softmax(score) without replacement (Gumbel-top-k), with timestamps increasing in the order drawn. So
the last item of each user (the test item after convert.py) follows the user's preference far more
than popularity alone, and a model that learns the factors clearly beats an item-popularity ranking.
The file is ml-20m style: header userId,movieId,rating,timestamp, 1-based userIds, and movieIds with
gaps so that convert.py's id maps are exercised. Generation streams user chunks, so memory stays
bounded at any size.

--output must not exist yet: synthetic.py never replaces a file, because nothing in a ratings.csv
proves who wrote it (ours has the same header as MovieLens's own ml-20m file, which it must not
overwrite). Remove the old file to regenerate it; prepare_dataset.sh reuses one that exists. The path
is checked before generation (a folder, a device such as /dev/full, an unwritable or uncreatable
folder are refused), and the file is written to a temporary name and renamed when complete, so a
full disk or Ctrl-C leaves nothing behind.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before numpy starts its thread pool)

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pandas as pd

from cli import EnvironmentFailure, UserError, atomic_file, check_output_path, main_guard

# (users, items, mean interactions per user) of the shapes the benchmarks and the quick start use.
PRESETS = {
    "default": (6000, 3000, 50.0),
    "ml-1m": (6040, 3706, 1_000_209 / 6040),
    "ml-20m": (138_493, 26_744, 20_000_263 / 138_493),
    "realistic": (2000, 1000, 40.0),
}
MIN_INTERACTIONS = 20  # MovieLens keeps only users with at least 20 ratings
PREFERENCE_STRENGTH = 3.0  # logit scale of <p_u, q_i>; large enough that preference beats popularity
POPULARITY_EXPONENT = 0.8  # Zipf exponent of item popularity
# The "realistic" preset's structure (factors, strength, Zipf exponent), closer to real ratings than the
# default's: more latent factors with a weaker preference signal, and a steeper popularity head, so
# that popularity explains more of each choice and a model must be fitted with care to beat it by much
# (on MovieLens, item popularity alone reaches about half of a tuned NeuMF's HR@10).
REALISTIC_STRUCTURE = (16, 1.5, 1.0)
CHUNK_CELLS = 1 << 23  # users x items scores materialised at once, per worker
WORKERS = 2
SAMPLE_STRIDE = 16  # top_k_per_row estimates each row's cut-off from every 16th score
FIRST_TIMESTAMP = 946_684_800  # 2000-01-01, MovieLens-like epoch seconds


class PlantedModel(NamedTuple):
    user_factors: np.ndarray  # [users, factors], already scaled by PREFERENCE_STRENGTH
    item_factors: np.ndarray  # [items, factors]
    log_popularity: np.ndarray  # [items]
    movie_ids: np.ndarray  # [items] original movieId of each item index

    def scores(self, users):
        """Planted logits of `users` (indices) for every item: the softmax the items are drawn from."""
        return self.user_factors[users] @ self.item_factors.T + self.log_popularity


def add_shape_flags(parser):
    """The flags that fix the ratings a seed gives: preset, sizes, planted factors, seed."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="shape: users, items and mean interactions per user")
    parser.add_argument("--users", type=int, help="number of users (overrides the preset)")
    parser.add_argument("--items", type=int, help="number of items (overrides the preset)")
    parser.add_argument("--interactions_per_user_mean", type=float,
                        help=f"mean interactions per user, at least {MIN_INTERACTIONS} (overrides the preset)")
    parser.add_argument("--factors", type=int, default=None,
                        help="latent factors of the planted model (default 8; 16 with --preset realistic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generator")


def resolve_shape(args):
    """Fill in what the preset decides (sizes, factors, preference strength, popularity exponent)."""
    users, items, mean = PRESETS[args.preset]
    factors, args.strength, args.popularity_exponent = REALISTIC_STRUCTURE if args.preset == "realistic" else \
        (8, PREFERENCE_STRENGTH, POPULARITY_EXPONENT)
    args.factors = factors if args.factors is None else args.factors
    args.users = users if args.users is None else args.users
    args.items = items if args.items is None else args.items
    if args.interactions_per_user_mean is None:
        args.interactions_per_user_mean = mean
    validate(args.users, args.items, args.interactions_per_user_mean, args.factors, args.seed)
    return args


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="CSV file to write (e.g. data/synthetic/ratings.csv)")
    add_shape_flags(parser)
    return parser.parse_args(argv)


def validate(users, items, interactions_per_user_mean, factors, seed=0):
    if users < 1:
        raise UserError(f"--users {users}: must be at least 1")
    if items < 2 * MIN_INTERACTIONS:
        raise UserError(f"--items {items}: must be at least {2 * MIN_INTERACTIONS} so every user "
                        f"can have {MIN_INTERACTIONS} distinct items and unseen ones remain")
    if not MIN_INTERACTIONS <= interactions_per_user_mean <= items / 4:
        raise UserError(f"--interactions_per_user_mean {interactions_per_user_mean}: must lie between "
                        f"{MIN_INTERACTIONS} and items/4 = {items / 4:g}")
    if factors < 1:
        raise UserError(f"--factors {factors}: must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")


def check_output(output):
    """A new file whose folder can be written (never replace what we cannot prove we wrote)."""
    check_output_path(output, "--output")
    if os.path.lexists(output):
        raise UserError(f"--output {output} already exists, and synthetic.py never replaces a file: "
                        "remove it to regenerate it, or choose another path")


def planted_model(users, items, factors=8, seed=0, strength=PREFERENCE_STRENGTH,
                  popularity_exponent=POPULARITY_EXPONENT):
    """The latent structure behind `generate_ratings(..., seed)`: same seed, same model."""
    rng = np.random.default_rng([seed, 0])
    # Unit-variance dot products whatever the number of factors.
    scale = factors ** -0.25
    user_factors = (strength * scale) * rng.standard_normal((users, factors))
    item_factors = scale * rng.standard_normal((items, factors))
    popularity_rank = rng.permutation(items) + 1
    log_popularity = -popularity_exponent * np.log(popularity_rank)
    movie_ids = 1 + np.sort(rng.choice(2 * items, size=items, replace=False))
    return PlantedModel(user_factors.astype(np.float32), item_factors.astype(np.float32),
                        log_popularity.astype(np.float32), movie_ids)


def interactions_per_user(users, items, mean, rng):
    """Long-tailed counts (lognormal above the minimum) with the requested mean, capped at items/2."""
    sigma = 1.0
    mu = np.log(mean - MIN_INTERACTIONS + 1e-9) - sigma ** 2 / 2
    extra = rng.lognormal(mu, sigma, size=users)
    return np.minimum(MIN_INTERACTIONS + np.rint(extra).astype(np.int64), items // 2)


def top_k_per_row(values, counts):
    """Column indices of each row's counts[j] largest values, largest first, concatenated row by row.

    A full partition of 27k-wide rows dominated generation time, so a cut-off taken from a strided
    sample of each row keeps only about 2k + 64 candidates; the result is still exact because a row
    whose cut-off lets fewer than k entries through keeps the whole row instead.
    """
    rows = len(values)
    sample = np.sort(values[:, ::SAMPLE_STRIDE], axis=1)
    wanted = np.minimum((2 * counts + 64) // SAMPLE_STRIDE + 1, sample.shape[1])
    cut = sample[np.arange(rows), sample.shape[1] - wanted]
    candidate = values >= cut[:, None]
    candidate[candidate.sum(axis=1) < counts] = True
    row, column = np.nonzero(candidate)
    # One float64 key orders rows, then values descending; -inf (a zero uniform draw) sorts last.
    order = np.argsort(row * 1e4 - np.clip(values[row, column], -1e3, 1e3), kind="stable")
    row, column = row[order], column[order]
    row_start = np.searchsorted(row, np.arange(rows))
    rank = np.arange(len(row)) - row_start[row]
    return column[rank < counts[row]]


def draw_items(model, users, counts, rng):
    """Gumbel-top-k: the first counts[j] items of each row, in order, are a draw without replacement."""
    scores = model.scores(users)
    # A uniform draw of exactly 0 (odds 2^-24 in float32) gives that item a score of -inf: harmless.
    with np.errstate(divide="ignore"):
        scores -= np.log(-np.log(rng.random(scores.shape, dtype=np.float32)))
    return top_k_per_row(scores, counts)  # row-major: user by user, in drawn order


def rating_chunk(model, users, counts, rng):
    """Columns of one block of consecutive users, rows sorted by (userId, movieId) like ml-20m."""
    item = draw_items(model, users, counts, rng)
    user = np.repeat(users, counts)
    # Strictly increasing per user in the order drawn, so the latest item is the last drawn.
    gaps = rng.integers(1, 86_400, size=len(item))
    elapsed = np.cumsum(gaps)
    first_in_user = np.r_[0, np.cumsum(counts)[:-1]]
    elapsed -= np.repeat(elapsed[first_in_user] - gaps[first_in_user], counts)
    start_time = FIRST_TIMESTAMP + rng.integers(0, 10 * 365 * 86_400, size=len(users))
    timestamp = np.repeat(start_time, counts) + elapsed
    movie = model.movie_ids[item]
    order = np.lexsort((movie, user))
    return {
        "userId": user[order] + 1,
        "movieId": movie[order],
        "half_stars": rng.integers(1, 11, size=len(item)),  # ratings 0.5 to 5.0 in steps of 0.5
        "timestamp": timestamp[order],
    }


def rating_chunks(users, items, interactions_per_user_mean, factors, seed, structure=()):
    """Validate the sizes now, then return an iterator over the ratings block by block, in user order.

    Each block has its own generator spawned from the seed, so two worker threads (numpy releases
    the GIL in the heavy kernels) give the same data as one, and memory stays bounded at any size.
    """
    validate(users, items, interactions_per_user_mean, factors, seed)
    model = planted_model(users, items, factors, seed, *structure)
    counts = interactions_per_user(users, items, interactions_per_user_mean, np.random.default_rng([seed, 1]))
    chunk = max(1, CHUNK_CELLS // items)
    starts = range(0, users, chunk)
    seeds = np.random.SeedSequence([seed, 2]).spawn(len(starts))

    def block(i):
        block_users = np.arange(starts[i], min(starts[i] + chunk, users))
        return rating_chunk(model, block_users, counts[block_users], np.random.default_rng(seeds[i]))

    def blocks():
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for window in range(0, len(starts), 2 * WORKERS):
                yield from pool.map(block, range(window, min(window + 2 * WORKERS, len(starts))))

    return blocks()


def generate_ratings(users=6000, items=3000, interactions_per_user_mean=50.0, factors=8, seed=0):
    """All ratings as one DataFrame (userId, movieId, rating, timestamp); for tests and benchmarks."""
    blocks = list(rating_chunks(users, items, interactions_per_user_mean, factors, seed))
    columns = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    return pd.DataFrame({"userId": columns["userId"], "movieId": columns["movieId"],
                         "rating": columns["half_stars"] / 2, "timestamp": columns["timestamp"]})


def _digits(values):
    """ASCII digits of non-negative ints, right-aligned, and a mask of those to print."""
    width = len(str(int(values.max())))
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    printed = values[:, None] >= powers
    printed[:, -1] = True  # 0 prints as "0"
    return (values[:, None] // powers % 10 + ord("0")).astype(np.uint8), printed


def _literal(text, rows):
    return np.full((rows, len(text)), list(text.encode()), dtype=np.uint8), np.ones((rows, len(text)), bool)


def csv_bytes(block):
    """The block's CSV lines, formatted with array operations: pandas.to_csv took ~1 min for 20M rows."""
    rows = len(block["userId"])
    whole, half = np.divmod(block["half_stars"], 2)
    rating = np.stack([whole + ord("0"), np.full(rows, ord(".")), half * 5 + ord("0")], axis=1)
    fields = [_digits(block["userId"]), _literal(",", rows), _digits(block["movieId"]), _literal(",", rows),
              (rating.astype(np.uint8), np.ones((rows, 3), bool)), _literal(",", rows),
              _digits(block["timestamp"]), _literal("\n", rows)]
    chars = np.hstack([chars for chars, _ in fields])
    return chars[np.hstack([printed for _, printed in fields])].tobytes()


def write_ratings_csv(path, users=6000, items=3000, interactions_per_user_mean=50.0, factors=8, seed=0,
                      structure=()):
    """Stream the ratings to `path` (atomically: temp file, then rename); return the row count.
    `structure`: (strength, popularity_exponent) of the planted model, default the module's constants."""
    rows = 0
    with atomic_file(path) as f:
        for text, count in csv_pieces(users, items, interactions_per_user_mean, factors, seed, structure):
            f.write(text)
            rows += count
    return rows


def csv_pieces(users, items, interactions_per_user_mean, factors, seed, structure=()):
    """The bytes of ratings.csv piece by piece, the header first, each with its number of rows."""
    blocks = rating_chunks(users, items, interactions_per_user_mean, factors, seed, structure)
    yield b"userId,movieId,rating,timestamp\n", 0
    for block in blocks:
        yield csv_bytes(block), len(block["userId"])


def ratings_sha256(users, items, interactions_per_user_mean, factors, seed, structure=()):
    """SHA-256 of the ratings.csv these flags write (as convert.py records it), without writing it."""
    digest = hashlib.sha256()
    for text, _ in csv_pieces(users, items, interactions_per_user_mean, factors, seed, structure):
        digest.update(text)
    return digest.hexdigest()


@main_guard
def main(argv=None):
    args = resolve_shape(parse_args(argv))
    check_output(args.output)
    try:
        rows = write_ratings_csv(args.output, args.users, args.items, args.interactions_per_user_mean,
                                 args.factors, args.seed, (args.strength, args.popularity_exponent))
    except OSError as err:  # atomic_file has removed its temporary file
        raise EnvironmentFailure(f"cannot write --output {args.output} ({err.strerror or err}); nothing was "
                                 "left behind: free some space or fix the folder, and rerun") from None
    print(f"wrote {args.output}: {rows} ratings, {args.users} users, {args.items} items")


if __name__ == "__main__":
    main()
