"""ncf.py --compile: what it hands to torch.compile. torch.compile is spied on here (a real compile takes tens
of seconds on a CPU); tests/test_cuda.py compiles for real on a GPU (benchmarks/gpu_check.sh runs it)."""
import pytest
import torch
import torch._inductor.config
from helpers import TINY_MODEL, epochs_of, load_benchmark, run_main, run_ncf

import ncf
from neumf import NeuMF


@pytest.fixture
def compiled(monkeypatch):
    """What torch.compile is asked to compile in this test, in order (each returned uncompiled)."""
    seen = []

    def spy(fn, *args, **kwargs):
        seen.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    with torch._inductor.config.patch(fallback_random=False):  # restored after the test
        yield seen


def kinds(seen):
    return ["model" if isinstance(fn, NeuMF) else fn.__name__ for fn in seen]


def test_compile_compiles_the_training_model_and_every_evaluation(tiny_cache, tmp_path, capsys, compiled):
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "2", "--checkpoint_dir", tmp_path / "ck",
                             "--log_path", tmp_path / "log.json", "--full_ranking", "--compile", *TINY_MODEL)
    assert status == 0, err
    # The training module once; each epoch's sampled and full-ranking scorers; never the popularity baseline.
    assert kinds(compiled) == ["model"] + ["score_candidates"] * 4
    assert torch._inductor.config.fallback_random  # eager's dropout draws under Inductor
    assert len(epochs_of(tmp_path / "log.json")) == 2
    assert "--compile on a CPU" in err


def test_compile_in_test_mode_compiles_the_scorer(trained_tiny, tiny_cache, capsys, compiled):
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "--mode", "test", "--load_checkpoint_path",
                             trained_tiny / "model.pth", "--compile", "--no_progress")
    assert status == 0, err
    assert kinds(compiled) == ["score_candidates"]


def test_without_compile_nothing_is_compiled(tiny_cache, tmp_path, capsys, compiled):
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck",
                             *TINY_MODEL)
    assert status == 0, err
    assert compiled == [] and "--compile" not in err


def test_a_compiled_scorer_scores_as_the_eager_one(loaded_tiny_cache, compiled):
    torch.manual_seed(0)
    model = NeuMF(loaded_tiny_cache.num_users, loaded_tiny_cache.num_items, 8, (16, 8)).eval()
    users = torch.arange(5, dtype=torch.int32)
    candidates = torch.randint(loaded_tiny_cache.num_items, (5, 7), dtype=torch.int32)
    eager = ncf.candidate_scorer(model)
    with torch.no_grad():
        torch.testing.assert_close(ncf.candidate_scorer(model, compiled=True)(users, candidates),
                                   eager(users, candidates), rtol=0, atol=0)
    assert kinds(compiled) == ["score_candidates"]


@pytest.mark.parametrize("switch", ["TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE"])
def test_compile_switched_off_by_the_environment_is_said(tiny_cache, tmp_path, capsys, compiled, monkeypatch, switch):
    monkeypatch.setenv(switch, "1")
    status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / "ck", "--compile",
                             *TINY_MODEL)
    assert status == 0, err
    assert f"{switch}=1 is set" in err and "this run is eager" in err
    assert "runs compiled as asked" not in err  # the CPU's note would contradict it


def test_each_compiled_run_starts_from_no_compiled_code(tiny_cache, tmp_path, capsys, compiled, monkeypatch):
    """tune.py runs its trials in one process, and torch keeps 8 compiled versions of a function, then runs it
    eagerly with no more than a log line: a --compile run drops what earlier runs compiled."""
    import torch._dynamo

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(compiled)))
    for run in range(2):
        status, _, err = run_ncf(capsys, "--data", tiny_cache, "-e", "1", "--checkpoint_dir", tmp_path / f"ck{run}",
                                 "--compile", *TINY_MODEL)
        assert status == 0, err
    assert resets == [0, 2]  # before anything of each run was compiled (a run of one epoch: its model, a scorer)


def test_throughput_refuses_a_compile_the_environment_switched_off(capsys, monkeypatch):
    """Its record would say "compiled": true over eager figures."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    status, out, err = run_main(load_benchmark("throughput").main, capsys, "--device", "cpu", "--compile",
                                "--batch_size", "8192", "--users", "300", "--items", "100", "--positives", "5000")
    assert status == 2 and out == ""
    (line,) = err.splitlines()
    assert "TORCHDYNAMO_DISABLE=1 is set" in line and "--compile" in line
