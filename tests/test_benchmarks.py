"""The benchmark scripts (spec §8) run: benchmarks/throughput.py and the GPU check's CPU path, at tiny
sizes, so they are ready whenever a GPU is lent."""
import json
import os

import pytest
from conftest import ROOT, _run, epochs_of

pytestmark = pytest.mark.slow


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
