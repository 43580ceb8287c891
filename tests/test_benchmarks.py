"""The speed work (spec §8): its fast paths compute what the plain ones do, and the benchmark scripts run.

The fused ReLU+dropout must draw Bernoulli masks from the seeded generator (torch's own mask where p is
not a multiple of 1/256) with the right gradient, and the factored evaluation scorer must rank like
the plain forward. benchmarks/throughput.py and the GPU
script's CPU path run at tiny sizes here, so they are ready whenever a GPU is lent.
"""
import json
import os

import pytest
import torch
from conftest import ROOT, _run, epochs_of

import neumf
from neumf import NeuMF, relu_dropout


@pytest.mark.parametrize("p", [0.5, 0.25, 0.75, 0.125, 26 / 256, 0.3])  # 1, 2, 2, 4, 8 bits; torch's mask
def test_fused_relu_dropout_keeps_one_minus_p_with_the_right_gradient(p):
    x = torch.randn(512, 256, requires_grad=True)
    torch.manual_seed(3)
    y = relu_dropout(x, p)
    torch.manual_seed(3)
    assert torch.equal(relu_dropout(x, p), y)  # the seed decides the mask
    positive = x.detach() > 0
    kept = (y != 0) & positive
    assert kept.sum().item() / positive.sum().item() == pytest.approx(1 - p, abs=0.01)
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p), rtol=1e-6, atol=0)
    assert (y[~kept] == 0).all()
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / (1 - p), 0.0), rtol=1e-6, atol=0)


def test_mask_table_reads_each_bit_field_of_a_byte():
    # 2 bits per element, p = 0.25 (kept iff the field is >= 1), scale 4/3; byte 0b11_10_01_00.
    table = neumf._mask_table(2, 1, 4 / 3)
    assert table.shape == (256, 4)
    assert table[0b11100100].tolist() == pytest.approx([0.0, 4 / 3, 4 / 3, 4 / 3])
    assert table[0].tolist() == [0.0] * 4


def test_dropout_mask_keeps_every_position_of_a_byte_alike():
    # Each of a byte's 8 bits becomes one element: every position must keep half, independently.
    torch.manual_seed(0)
    mask = neumf.dropout_mask((1 << 16, 8), 0.5)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    kept = (mask > 0).double()
    torch.testing.assert_close(kept.mean(0), torch.full((8,), 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    corr = torch.corrcoef(kept.T) - torch.eye(8, dtype=torch.float64)
    assert corr.abs().max().item() < 0.03
    assert neumf.dropout_mask((7,), 0.3) is None  # 0.3 is no multiple of 1/256: torch's mask instead


def test_random_bytes_are_uniform():
    torch.manual_seed(0)
    counts = torch.bincount(neumf.random_bytes(1 << 20).long(), minlength=256).double()
    expected = (1 << 20) / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 400  # chi-square, 255 degrees of freedom


@pytest.mark.parametrize("p", [0.3, 0.1])
def test_fused_relu_dropout_draws_torchs_mask_for_other_p(p):
    x = torch.randn(257, 33, requires_grad=True)
    grad = torch.randn(257, 33)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout(torch.relu(x), p, training=True)
    next_expected = torch.rand(1)
    expected.backward(grad)
    expected_grad, x.grad = x.grad, None
    torch.manual_seed(7)
    out = relu_dropout(x, p)
    got = out.clone()  # the backward writes the input gradient over the output
    next_got = torch.rand(1)
    out.backward(grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=0)
    assert next_got == next_expected  # the same random numbers consumed: later masks agree too


def test_score_candidates_ranks_as_the_plain_forward():
    torch.manual_seed(0)
    model = NeuMF(50, 40, mf_dim=8, mlp_layer_sizes=(16, 32, 8), dropout=0.5).eval()
    users = torch.arange(50, dtype=torch.int32)
    candidates = torch.randint(40, (50, 11), dtype=torch.int32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # far from init, so rounding differences would show
        plain = model(users[:, None].expand_as(candidates).reshape(-1), candidates.reshape(-1)).view(50, 11)
        for chunk in (7, 8192):  # several pieces and one
            old, neumf.SCORE_CHUNK_SAMPLES = neumf.SCORE_CHUNK_SAMPLES, chunk
            try:
                torch.testing.assert_close(model.score_candidates(users, candidates), plain, rtol=1e-5, atol=1e-4)
            finally:
                neumf.SCORE_CHUNK_SAMPLES = old
        # Under autocast (and on GPUs) the pieces are scored by the allocating loop instead.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(users[:, None].expand_as(candidates).reshape(-1), candidates.reshape(-1)).view(50, 11)
            torch.testing.assert_close(model.score_candidates(users, candidates), plain, rtol=0.01, atol=0.01)


def test_throughput_benchmark_prints_one_json_per_configuration():
    result = _run(["benchmarks/throughput.py", "--device", "cpu", "--batch_size", "1024", "2048",
                   "--precision", "fp32", "amp", "--users", "300", "--items", "100", "--positives", "5000",
                   "--eval_users", "100", "--factors", "8", "--layers", "16", "8", "--warmup", "1", "--steps", "2"],
                  timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{\"device\"")]
    assert [(r["batch_size"], r["precision"]) for r in records] == [
        (1024, "fp32"), (1024, "bf16 autocast"), (2048, "fp32"), (2048, "bf16 autocast")]
    for r in records:
        assert r["device"] == "cpu"
        for key in ("train_samples_per_s", "eval_samples_per_s", "peak_memory_bytes"):
            assert r[key] > 0, key
        assert r["fraction_of_floor"] > 0
    assert "GFLOP/s" in result.stdout and "kFLOP" in result.stdout


def test_gpu_check_script_cpu_path(tmp_path):
    out = tmp_path / "out"
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK)
    result = _run([str(script)], env={"DEVICE": "cpu", "OUT": str(out)}, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for name in ("environment.txt", "pytest_cuda.txt", "throughput.txt", "throughput.jsonl", "train.txt",
                 "train.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "throughput.jsonl").read_text().splitlines()) == 2
    assert epochs_of(out / "train.jsonl")


def test_fused_relu_dropout_takes_an_empty_batch():
    x = torch.empty(0, 8, requires_grad=True)
    relu_dropout(x, 0.5).sum().backward()
    assert x.grad.shape == (0, 8)
