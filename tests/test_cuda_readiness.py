"""CUDA-path logic that a CPU can check (issue 16): TF32 switched on and reported, no host round trip per
evaluation batch, full ranking through the factored scoring, --save_every. (Resuming a scaler-less last.pth
under fp16 is tested in test_resume.py.)"""
import pytest
import torch
from helpers import TINY_MODEL

import checkpoint
import dataloading
import ncf
from dataloading import FullRankingData
from devices import choose_precision, matmul_precision, set_matmul_precision
from neumf import build_model

CPU = torch.device("cpu")


def test_tf32_is_switched_on_for_cuda_and_reported_as_in_force():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert set_matmul_precision(torch.device("cpu")) == "fp32"
        assert not torch.backends.cuda.matmul.allow_tf32
        assert set_matmul_precision(torch.device("cuda", 0)) == "TF32"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert matmul_precision(torch.device("cpu")) == "fp32"  # no TF32 on a CPU, whatever the flag
        torch.backends.cuda.matmul.allow_tf32 = False
        assert matmul_precision(torch.device("cuda", 0)) == "fp32"  # what is in force, not what was asked
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def host_traffic(prof):
    """Host reads of device values and host values made into tensors (what syncs or copies on CUDA)."""
    names = ("aten::_local_scalar_dense", "aten::lift_fresh")  # not scalar_tensor: wrapped host numbers
    return sum(1 for event in prof.events() if event.name in names)


@pytest.mark.parametrize("kind", ["sampled", "full ranking"])
def test_evaluation_touches_the_host_once_however_many_batches(loaded_tiny_cache, kind):
    cache = loaded_tiny_cache
    torch.manual_seed(0)
    model = build_model({"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.0}, CPU)
    model.cpu_kernels = False  # as build_model makes it for CUDA (the CPU kernels check their indices on the host)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    precision = choose_precision("O0", "auto", CPU)
    if kind == "sampled":
        data, evaluate, per_user = dataloading.TestData.from_cache(cache, CPU), ncf.evaluate, 51
    else:
        data, evaluate, per_user = FullRankingData.from_cache(cache, CPU), ncf.evaluate_full_ranking, cache.num_items
    counts, results = [], []
    for users_per_batch in (cache.num_users, 7):  # one batch, then 43
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results.append(evaluate(model, data, 10, users_per_batch * per_user, precision, ctx))
        counts.append(host_traffic(prof))
    assert counts[0] == counts[1] <= 2, counts
    # The loss sums float scores, which another batching rounds otherwise; ranks compare, and stay exact.
    if kind == "sampled":
        losses = [result.pop("eval_loss") for result in results]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert results[0] == pytest.approx(results[1], abs=1e-12)


def test_host_traffic_counter_sees_a_tensor_made_per_batch():
    """The counter above is not blind to what evaluation did before: torch.tensor(n, device=...) per batch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for n in range(5):
            torch.tensor(float(n))
    assert host_traffic(prof) >= 5


def test_save_every_writes_last_pth_every_n_epochs_and_at_the_end(tiny_cache, tmp_path, monkeypatch):
    written = []
    real_save = checkpoint.save_atomic

    def recording_save(obj, path):
        written.append((obj["epoch"], path.rsplit("/", 1)[-1]))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", recording_save)
    ncf.main(["--data", str(tiny_cache), "-e", "5", "--save_every", "2", "--checkpoint_dir", str(tmp_path / "ck"),
              *TINY_MODEL])
    assert [epoch for epoch, name in written if name == "last.pth"] == [2, 4, 5]
    assert [epoch for epoch, name in written if name == "model.pth"]  # the best epoch, whenever it improves
