"""The device-resident epoch sampler and the evaluation candidates."""
import torch

import dataloading
from dataloading import EpochSampler


def make_train(users=40, per_user=10, items=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [(u, i) for u in range(users) for i in sorted(torch.randperm(items, generator=g)[:per_user].tolist())]
    return torch.tensor(rows, dtype=torch.int32), items


def epoch_samples(sampler, epoch=1, batch=128, rank=0, world=1, ga=1):
    users, items, labels = [], [], []
    for micro_batches, _ in sampler.epoch(epoch, batch, rank, world, ga):
        for u, i, y in micro_batches:
            users.append(u)
            items.append(i)
            labels.append(y)
    return torch.cat(users), torch.cat(items), torch.cat(labels)


def test_each_positive_once_and_negatives_per_positive():
    train, num_items = make_train()
    sampler = EpochSampler(train, num_items, negatives=4, device="cpu", seed=3)
    users, items, labels = epoch_samples(sampler, batch=100)  # 2000 samples, 20 full batches
    assert len(labels) == 400 * 5
    positives = torch.stack((users[labels == 1], items[labels == 1]), 1)
    assert sorted(map(tuple, positives.tolist())) == sorted(map(tuple, train.tolist()))
    # Every user appears (1 + negatives) times per positive.
    assert torch.bincount(users.long()).tolist() == [50] * 40


def test_negative_items_are_uniform_over_all_items():
    train, num_items = make_train(users=200, per_user=25)
    sampler = EpochSampler(train, num_items, negatives=4, device="cpu", seed=0)
    _, items, labels = epoch_samples(sampler, batch=4096)
    counts = torch.bincount(items[labels == 0].long(), minlength=num_items).double()
    expected = counts.sum() / num_items
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 120  # 59 degrees of freedom: p < 1e-6 beyond this


def test_order_is_shuffled_and_depends_on_epoch_and_seed():
    train, num_items = make_train()
    a = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), epoch=1)
    again = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), epoch=1)
    other_epoch = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), epoch=2)
    other_seed = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=2), epoch=1)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert not torch.equal(a[0], other_epoch[0])
    assert not torch.equal(a[0], other_seed[0])
    # Positives are spread through the epoch, not first.
    assert 0.1 < a[2][:400].mean().item() < 0.3


def test_ranks_and_micro_batches_partition_the_global_batch():
    train, num_items = make_train()
    sampler = EpochSampler(train, num_items, 4, "cpu", seed=0)
    single = list(sampler.epoch(1, 200, 0, 1, 1))
    shares = [list(sampler.epoch(1, 200, rank, 2, 2)) for rank in range(2)]
    assert len(single) == len(shares[0]) == len(shares[1]) == 10
    for step, (micro, size) in enumerate(single):
        joined = [torch.cat([mb[field] for rank in range(2) for mb in shares[rank][step][0]]) for field in range(3)]
        assert [len(mb[0]) for mb in shares[0][step][0]] == [50, 50]
        assert shares[0][step][1] == size == 200
        for field in range(3):
            assert torch.equal(joined[field], micro[0][field])


def test_last_batch_is_cut_to_equal_shares():
    train, num_items = make_train(users=7, per_user=3)  # 21 positives, 105 samples
    sampler = EpochSampler(train, num_items, 4, "cpu", seed=0)
    # 2 ranks x 2 micro-batches: the 9 samples left after two batches of 48 are cut to 8.
    steps = list(sampler.epoch(1, 48, 1, 2, 2))
    assert [size for _, size in steps] == [48, 48, 8]
    assert [len(users) for users, _, _ in steps[-1][0]] == [2, 2]
    assert sampler.steps_per_epoch(48, 4) == 3
    # Fewer samples left than ranks x micro-batches: no last step at all.
    assert sampler.steps_per_epoch(52, 4) == 2


def test_batches_are_int32_whatever_the_positives_dtype():
    """Positives given as int64 (a tensor of the user's own) give the same samples, as int32 users and items."""
    train, num_items = make_train()
    ours = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), batch=96, world=2, ga=2)
    wide = epoch_samples(EpochSampler(train.long(), num_items, 4, "cpu", seed=1), batch=96, world=2, ga=2)
    assert [x.dtype for x in wide] == [torch.int32, torch.int32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(ours, wide, strict=True))


def test_a_last_batch_of_exactly_one_sample_a_share_is_kept():
    train, num_items = make_train()  # 400 positives, 2,000 samples an epoch
    sampler = EpochSampler(train, num_items, 4, "cpu", seed=0)
    assert sampler.steps_per_epoch(999, 2) == 3  # 2 samples left over: one for each of 2 shares
    assert sampler.steps_per_epoch(999, 3) == 2  # 2 left over cannot be split in 3 equal shares
    assert sampler.steps_per_epoch(1000, 2) == 2


def test_an_epoch_too_large_for_int32_indices_draws_the_same_samples_in_int64(monkeypatch):
    """The permutation is int32 up to 2^31 - 1 samples an epoch, int64 past it: the same samples either way."""
    assert dataloading.permutation_dtype(2**31 - 1) == torch.int32
    assert dataloading.permutation_dtype(2**31) == torch.int64
    train, num_items = make_train()
    narrow = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), batch=96, world=2, ga=2)
    monkeypatch.setattr(dataloading, "permutation_dtype", lambda count: torch.int64)
    wide = epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1), batch=96, world=2, ga=2)
    assert [x.dtype for x in wide] == [torch.int32, torch.int32, torch.float32]
    assert all(torch.equal(a, b) for a, b in zip(narrow, wide, strict=True))


def test_the_epoch_s_permutation_is_drawn_in_int32(monkeypatch):
    """int32 where it fits: ml-20m's 99.3M samples take 397 MB less than in int64, and a batch's % and gather are
    int32's (the same samples: the test above)."""
    train, num_items = make_train()
    dtypes, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *args, **kwargs: dtypes.append(kwargs.get("dtype")) or
                        randperm(*args, **kwargs))
    epoch_samples(EpochSampler(train, num_items, 4, "cpu", seed=1))
    assert dtypes == [torch.int32]
