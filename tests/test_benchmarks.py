"""The benchmark scripts run: benchmarks/throughput.py and the GPU check's CPU path, at tiny
sizes, so they are ready whenever a GPU is lent; the figures they print agree with each other and with
the floor formula worked out by hand."""
import argparse
import json
import os

import pytest
import torch
from helpers import ROOT, epochs_of, load_benchmark, run


def load_throughput():
    return load_benchmark("throughput")


def median(values):
    return sorted(values)[len(values) // 2]


@pytest.mark.slow
def test_throughput_profile_names_the_operators_of_most_self_time():
    """--profile N: the N operators of most self time over the profiled steps, in the record and printed; the
    matmuls are among them, and the shares, of the steps' whole self time, add up to at most 1."""
    result = run(["benchmarks/throughput.py", "--device", "cpu", "--batch_size", "1024", "--precision", "fp32",
                  "--users", "300", "--items", "100", "--positives", "5000", "--eval_users", "100", "--factors", "8",
                  "--layers", "16", "8", "--warmup", "1", "--steps", "2", "--no_floor", "--profile", "12"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{\"device\"")]
    profile = record["profile"]
    # 12 of the 80-odd operators: at this tiny size each takes well under a millisecond, and a top 4 was seen
    # without a matmul on a loaded machine.
    assert len(profile) == 12 and any(op["name"] in ("aten::mm", "aten::addmm") for op in profile)
    assert 0 < sum(op["share"] for op in profile) <= 1 and all(op["calls"] > 0 for op in profile)
    assert [op["share"] for op in profile] == sorted((op["share"] for op in profile), reverse=True)
    assert "profile, batch 1,024 fp32" in result.stdout


@pytest.mark.slow
def test_throughput_benchmark_prints_one_json_per_configuration():
    result = run(["benchmarks/throughput.py", "--device", "cpu", "--batch_size", "1024", "2048",
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
    (floor_line,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"floor"')]
    floor = floor_line["floor"]
    throughput = load_throughput()
    shape = argparse.Namespace(layers=[16, 8], factors=8, users=300, items=100, candidates=101)
    for r in records:
        # The rates are the samples over the median times the record holds.
        assert r["timed_steps"] == len(r["step_s_all"]) == 2
        assert r["step_s_median"] == median(r["step_s_all"])
        assert r["train_samples_per_s"] == pytest.approx(r["batch_size"] / r["step_s_median"], rel=1e-12)
        assert r["eval_samples"] == 100 * 101
        assert r["eval_s"] == median(r["eval_s_all"]) and len(r["eval_s_all"]) == 3
        assert r["eval_samples_per_s"] == pytest.approx(r["eval_samples"] / r["eval_s"], rel=1e-12)
        # The floor: the larger of the FLOP time and the memory time per sample, at the measured rates.
        cost = throughput.per_sample_cost(shape, r["batch_size"], "cpu")
        assert cost["factored"]  # batches of 1024 and 2048 outnumber the 400 table rows
        assert r["train_flops_per_sample"] == cost["train_flops"]
        # fp32 rows against the fp32 matmul rate, AMP rows against the bf16 one (measured alike).
        rate = floor["matmul_flops_per_s"] if r["precision"] == "fp32" else floor["amp_matmul_flops_per_s"]
        seconds = max(cost["train_flops"] / rate,
                      (cost["train_bytes"] + cost["step_bytes"] / r["batch_size"]) / floor["copy_bytes_per_s"])
        assert r["floor_train_samples_per_s"] == pytest.approx(1 / seconds, rel=1e-12)
        assert r["fraction_of_floor"] == pytest.approx(r["train_samples_per_s"] / r["floor_train_samples_per_s"],
                                                       rel=1e-12)
    whole = throughput.per_sample_cost(shape)
    assert {key: floor[key] for key in whole} == whole


def test_the_floor_formula_on_a_shape_worked_out_by_hand():
    """layers 6 -> 4, 3 factors, 5 users, 7 items, 11 candidates. Per sample, multiply-adds: the first
    layer 6 x 4 = 24 and the output layer (3 + 4) x 1 = 7, so 31; training is 3 x the forward (backward
    twice), at 2 FLOPs each: 6 x 31 = 186."""
    cost = load_throughput().per_sample_cost
    shape = argparse.Namespace(layers=[6, 4], factors=3, users=5, items=7, candidates=11)
    per_sample = cost(shape)
    assert per_sample["train_flops"] == per_sample["recipe_train_flops"] == 186
    # Evaluation: all but the first layer per candidate, 2 x 7 = 14, plus the user term 3 x 4 per user
    # (once for its 11 candidates): 14 + 2 x 12 / 11.
    assert per_sample["eval_flops"] == pytest.approx(14 + 24 / 11)
    # Parameters: (5 + 7) rows x (3 + 3) columns, the layer 6 x 4 + 4, the output layer 3 + 4 + 1: 108, and
    # 8 fp32 passes over each per optimizer step.
    assert per_sample["params"] == 108 and per_sample["step_bytes"] == 108 * 4 * 8
    # Bytes per training sample: the gathered rows 2 x (3 + 3) and the rest of the activations 4 + 3 + 4 + 1,
    # each written and read (x 2), with their gradients (x 2), 4 bytes each: 24 x 16.
    assert per_sample["train_bytes"] == 24 * 16
    # Per eval sample: the first layer's terms and GMF rows gathered, 2 x (4 + 3), and the rest, 12: 26 x 8.
    assert per_sample["eval_bytes"] == 26 * 8
    # A CPU micro-batch of at least 5 + 7 samples computes the first layer once per table row: per sample
    # 6 x (31 - 24) plus 6 x 12 rows x 3 x 4 shared by the 12 samples = 42 + 72; the gathered rows become
    # the first layer's outputs, 2 x (4 + 3).
    factored = cost(shape, micro_batch=12, device="cpu")
    assert factored["factored"] and factored["train_flops"] == 42 + 72
    assert factored["train_bytes"] == (14 + 12) * 16
    assert not cost(shape, micro_batch=11, device="cpu")["factored"]
    assert not cost(shape, micro_batch=12, device="cuda")["factored"]  # GPUs keep the per-sample layout


@pytest.mark.slow
def test_gpu_check_script_cpu_path(tmp_path):
    out = tmp_path / "out"
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK)
    result = run([str(script)], env={"DEVICE": "cpu", "OUT": str(out)}, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    for name in ("environment.txt", "pytest_cuda.txt", "throughput.txt", "throughput.jsonl", "train.txt",
                 "train.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "throughput.jsonl").read_text().splitlines()) == 2
    (compiled,) = map(json.loads, (out / "throughput_compile.jsonl").read_text().splitlines())
    assert compiled["compiled"] and compiled["precision"] == "fp32" and compiled["eval_samples_per_s"] > 0
    assert epochs_of(out / "train.jsonl")
    if not torch.cuda.is_available():  # nothing CUDA ran: the summary must not say "ok"
        summary = (out / "summary.txt").read_text()
        assert "skipped: no CUDA" in summary and "ran: no sync detection on a CPU" in summary
        assert not any(line.startswith("host syncs") and line.endswith(" ok") for line in summary.splitlines())
    # A second run into the folder it wrote is fine; see below for one that holds someone else's files.
    assert (out / ".written-by-gpu_check").exists()


@pytest.mark.parametrize("env, words", [
    ({"DEVICE": "cpu", "PYTHON": "/usr/bin/env"}, ["cannot import torch", "nothing was run"]),
    ({"DEVICE": "cpu"}, ["holds files this script did not write", "new or empty folder"]),
], ids=["no torch", "OUT holds the user's files"])
def test_gpu_check_refuses_in_one_line_and_touches_nothing(tmp_path, env, words):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.txt").write_text("mine\n")
    (out / "throughput_compile.jsonl").write_text("mine\n")
    result = run([str(ROOT / "benchmarks" / "gpu_check.sh")], env={**env, "OUT": str(out)}, timeout=120)
    assert result.returncode == 2 and result.stdout == "", (result.stdout[-2000:], result.stderr[-2000:])
    (line,) = result.stderr.splitlines()
    assert line.startswith("gpu_check.sh: error: ") and all(w in line for w in words), line
    assert sorted(p.name for p in out.iterdir()) == ["summary.txt", "throughput_compile.jsonl"]
    assert (out / "summary.txt").read_text() == (out / "throughput_compile.jsonl").read_text() == "mine\n"


@pytest.mark.slow
def test_batch_recommend_benchmark_times_the_command_in_one_process_per_configuration():
    """benchmarks/batch_recommend_benchmark.py at a tiny shape: one record per (source, precision), each timed
    in its own process (the onnx one without torch), the users/s its own figures give."""
    result = run(["benchmarks/batch_recommend_benchmark.py", "--users", "300", "--items", "200", "--positives",
                   "6000", "--users_timed", "120", "--chunk_users", "50", "-k", "5", "--format", "csv"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["source"], r["precision_run"]) for r in records] == [
        ("checkpoint", "fp32"), ("checkpoint", "bf16 autocast"), ("onnx", "fp32")]
    for r in records:
        assert r["rows"] == 120 * 5 and r["file_bytes"] > 0 and r["format"] == "csv"
        assert r["users_per_s"] == pytest.approx(120 / r["seconds"], rel=1e-12)
        assert 0 < r["rss_before_bytes"] <= r["peak_rss_bytes"]
    # The onnx process holds no torch: far less memory than the checkpoint's (torch alone is ~300 MB).
    assert records[2]["rss_before_bytes"] < records[0]["rss_before_bytes"]
    assert "users/s" in result.stdout and "all users, h" in result.stdout


def test_the_matmul_rate_is_not_measured_on_a_cold_first_product(monkeypatch):
    """The first product of a dtype on CUDA loads its kernels and took longer than try_s on an H200: timed, it
    stopped the size doubling at 4,096 rows, where launches dominate (fp16 read 16 TFLOP/s, a tenth of TF32).
    Here the first timed product is slow: the rate must come from a size past it."""
    throughput = load_throughput()
    calls = []

    def best_seconds(device, work, tries=5):
        calls.append(work.args[0].shape[0])
        return 1.0 if len(calls) == 1 else work.args[0].shape[0] * 1e-9  # cold first call, then 1 ns a row

    monkeypatch.setattr(throughput, "best_seconds", best_seconds)
    rate = throughput.matmul_rate(torch.device("cpu"), torch.float32, width=8, try_s=1e-3)
    assert calls[0] == 4096 and max(calls) == 1 << 20  # doubled until a product took try_s (2^20 rows: 1 ms)
    assert rate == pytest.approx(2 * 8 * 8 / 1e-9)


def test_a_cuda_profile_ranks_operators_by_kernel_time():
    """On CUDA an operator's self CPU time is its launch: the profile must rank by device (kernel) time."""
    throughput = load_throughput()
    events = [argparse.Namespace(key="aten::mm", self_cpu_time_total=10.0, self_device_time_total=900.0, count=2),
              argparse.Namespace(key="aten::copy_", self_cpu_time_total=80.0, self_device_time_total=100.0, count=5)]
    on_cuda = throughput.top_operators(events, torch.device("cuda"), 2)
    assert [op["name"] for op in on_cuda] == ["aten::mm", "aten::copy_"]
    assert on_cuda[0]["self_s"] == pytest.approx(900e-6) and on_cuda[0]["share"] == pytest.approx(0.9)
    on_cpu = throughput.top_operators(events, torch.device("cpu"), 1)
    assert on_cpu == [{"name": "aten::copy_", "self_s": pytest.approx(80e-6), "share": pytest.approx(80 / 90),
                       "calls": 5}]


def test_sync_check_counts_syncs_not_the_prototype_notice():
    """torch.cuda.set_sync_debug_mode warns once that it is a prototype: no sync (it failed the training steps
    on the first H200 run)."""
    sync_check = load_benchmark("sync_check")
    texts = ["Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
             "operations (Triggered internally at Module.cpp:1003.)",
             "called a synchronizing CUDA operation (Triggered internally at CUDAFunctions.cpp:162.)\nstack"]
    assert sync_check.sync_messages(texts) == ["called a synchronizing CUDA operation (Triggered internally at "
                                               "CUDAFunctions.cpp:162.)"]
