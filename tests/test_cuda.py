"""Training and evaluation on a CUDA device (skipped without one; benchmarks/gpu_check.sh runs them)."""
import pytest
import torch
from helpers import epochs_of, event_of, train

import dataloading
import ncf
from dataloading import EpochSampler, load_cache
from devices import choose_precision
from neumf import NeuMF

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_epoch_samples_are_made_on_the_gpu(synthetic_cache):
    cache = load_cache(synthetic_cache)
    sampler = EpochSampler(cache.train, cache.num_items, 4, CUDA, seed=1)
    (users, items, labels), = next(sampler.epoch(1, 4096, 0, 1, 1))[0]
    assert {users.device.type, items.device.type, labels.device.type, sampler.users.device.type} == {"cuda"}


def test_amp_fp16_training_on_the_gpu_learns(synthetic_cache, tmp_path):
    _, log, _ = train(synthetic_cache, tmp_path, "--device", "cuda", "--opt_level", "O2", "-e", "3")
    config = event_of(log, "config")
    assert config["device"].startswith("cuda") and config["precision"] == "fp16 autocast"
    assert epochs_of(log)[-1]["hr"] > config["popularity_hr"] + 0.1


def test_gpu_evaluation_matches_the_cpu(synthetic_cache):
    cache = load_cache(synthetic_cache)
    torch.manual_seed(0)
    model = NeuMF(cache.num_users, cache.num_items, 8, (16, 8)).eval()
    results = {}
    for device in (torch.device("cpu"), CUDA):
        ctx = ncf.DistContext(0, 0, 1, device)
        precision = choose_precision("O0", "auto", device)
        test_data = dataloading.TestData.from_cache(cache, device)
        results[device.type] = ncf.evaluate(model.to(device), test_data, 10, 4096, precision, ctx)
    assert results["cuda"] == pytest.approx(results["cpu"], abs=2e-3)


def test_compiled_training_learns_as_eager_does_on_the_gpu(synthetic_cache, tmp_path):
    """--compile: Inductor's code with eager's dropout draws learns as eager does. Not the same numbers: fused
    kernels round differently and Adam amplifies it within an epoch (on a CPU, one epoch's mean loss moved in the
    fourth decimal and HR@10 by 0.02 after two), so the epochs' losses agree loosely and the run must learn."""
    logs = {name: train(synthetic_cache, tmp_path, "--device", "cuda", "-e", "2", *flags, name=name)[1]
            for name, flags in (("eager", ()), ("compiled", ("--compile",)))}
    runs = {name: epochs_of(log) for name, log in logs.items()}
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-2)
    assert runs["compiled"][-1]["hr"] > event_of(logs["compiled"], "config")["popularity_hr"] + 0.1
