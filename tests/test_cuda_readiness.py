"""CUDA-path logic that a CPU can check (issue 16): resuming a scaler-less last.pth under fp16, no host
round trip per evaluation batch, full ranking through the factored scoring, --save_every."""
import pytest
import torch
from conftest import TINY_MODEL, make_tiny_cache

import checkpoint
import dataloading
import ncf
from dataloading import FullRankingData, load_cache
from devices import choose_precision, matmul_precision, set_matmul_precision
from neumf import build_model

CPU = torch.device("cpu")


class StubScaler:
    def __init__(self, enabled):
        self.enabled, self.loaded = enabled, None

    def is_enabled(self):
        return self.enabled

    def load_state_dict(self, state):
        self.loaded = state


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


def test_an_enabled_scaler_cannot_load_the_state_of_a_disabled_one():
    """Why restore_scaler exists: what every CPU, O0 or bf16 run saves breaks an fp16 resume."""
    saved = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved == {}
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved)


def test_resume_restores_the_scaler_only_from_a_saved_state():
    with pytest.warns(UserWarning, match="fresh loss scale"):
        ncf.restore_scaler(fp16 := StubScaler(enabled=True), {})
    assert fp16.loaded is None
    ncf.restore_scaler(fp16, {"scale": 1024.0})
    assert fp16.loaded == {"scale": 1024.0}
    ncf.restore_scaler(fp32 := StubScaler(enabled=False), {})  # no warning: nothing to restore
    assert fp32.loaded is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_cache(str(make_tiny_cache(tmp_path_factory.mktemp("cuda_ready"))))


def host_traffic(prof):
    """Host reads of device values and host values made into tensors (what syncs or copies on CUDA)."""
    names = ("aten::_local_scalar_dense", "aten::lift_fresh")  # not scalar_tensor: wrapped host numbers
    return sum(1 for event in prof.events() if event.name in names)


@pytest.mark.parametrize("kind", ["sampled", "full ranking"])
def test_evaluation_touches_the_host_once_however_many_batches(tiny, kind):
    torch.manual_seed(0)
    model = build_model({"nb_users": tiny.num_users, "nb_items": tiny.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.0}, CPU)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    precision = choose_precision("O0", "auto", CPU)
    if kind == "sampled":
        data, evaluate, per_user = dataloading.TestData.from_cache(tiny, CPU), ncf.evaluate, 51
    else:
        data, evaluate, per_user = FullRankingData.from_cache(tiny, CPU), ncf.evaluate_full_ranking, tiny.num_items
    counts, results = [], []
    for users_per_batch in (tiny.num_users, 7):  # one batch, then 43
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            results.append(evaluate(model, data, 10, users_per_batch * per_user, precision, ctx))
        counts.append(host_traffic(prof))
    assert counts[0] == counts[1] <= 2, counts
    assert results[0] == pytest.approx(results[1], abs=1e-12)


def test_host_traffic_counter_sees_a_tensor_made_per_batch():
    """The counter above is not blind to what evaluation did before: torch.tensor(n, device=...) per batch."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for n in range(5):
            torch.tensor(float(n))
    assert host_traffic(prof) >= 5


def test_save_every_writes_last_pth_every_n_epochs_and_at_the_end(tiny, tmp_path, monkeypatch):
    written = []
    real_save = checkpoint.save_atomic

    def recording_save(obj, path):
        written.append((obj["epoch"], path.rsplit("/", 1)[-1]))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", recording_save)
    cache_dir = make_tiny_cache(tmp_path / "data")
    ncf.main(["--data", str(cache_dir), "-e", "5", "--save_every", "2", "--checkpoint_dir", str(tmp_path / "ck"),
              *TINY_MODEL])
    assert [epoch for epoch, name in written if name == "last.pth"] == [2, 4, 5]
    assert [epoch for epoch, name in written if name == "model.pth"]  # the best epoch, whenever it improves
