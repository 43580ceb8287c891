"""inference.py recommend (serving.py) and benchmark (benchmarks/inference_benchmark.py): recommendations in
original ids that skip training items; a benchmark that prints JSON."""
import json
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

import inference
import serving
from cli import UserError
from dataloading import load_cache
from neumf import build_model

sys.path.insert(0, str(ROOT / "benchmarks"))
import inference_benchmark

pytestmark = pytest.mark.slow


def test_recommendations_skip_training_items_in_original_ids(tiny_cache, trained_tiny, run_cli):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    cache = load_cache(str(cache_dir))
    dense_users = [0, 7, 123, cache.num_users - 1]
    original_users = cache.user_ids[dense_users].tolist()
    result = run_cli(["inference.py", "recommend", "--data", cache_dir, "--checkpoint", checkpoint,
                      "--users", *original_users, "--topk", 10, "--device", "cpu", "--json"])
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [r["user"] for r in out["recommendations"]] == original_users

    model = build_model(torch.load(checkpoint, weights_only=True)["config"], torch.device("cpu")).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    dense_of_item = {int(original): dense for dense, original in enumerate(cache.item_ids.tolist())}
    for dense_user, rec in zip(dense_users, out["recommendations"], strict=True):
        assert len(rec["items"]) == 10 and len(set(rec["items"])) == 10
        trained_items = set(cache.train[cache.train[:, 0] == dense_user, 1].tolist())
        items = [dense_of_item[i] for i in rec["items"]]  # KeyError if an id is not an original item id
        assert not trained_items & set(items)
        scores = np.array(rec["scores"])
        assert ((scores > 0) & (scores < 1)).all()
        assert (np.diff(scores) <= 0).all()
        # Brute force: sigmoid of every item's logit, training items removed, argmax and top-10.
        with torch.no_grad():
            logits = model(torch.full((cache.num_items,), dense_user), torch.arange(cache.num_items))
        probs = torch.sigmoid(logits).numpy()
        untrained = np.array([i for i in range(cache.num_items) if i not in trained_items])
        best = untrained[np.argmax(probs[untrained])]
        assert cache.item_ids[best].item() == rec["items"][0]
        assert scores == pytest.approx(np.sort(probs[untrained])[::-1][:10], abs=1e-6)
        assert scores == pytest.approx(probs[items], abs=1e-6)


def test_recommend_prints_a_table(tiny_cache, trained_tiny, capsys):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    user = load_cache(str(cache_dir)).user_ids[5].item()
    inference.main(["recommend", "--data", str(cache_dir), "--checkpoint", str(checkpoint), "--users", str(user),
                    "--topk", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"user {user}:") and len(lines) == 2 + 3
    assert [line.split()[0] for line in lines[2:]] == ["1", "2", "3"]


def test_unknown_user_is_a_user_error(tiny_cache, trained_tiny, run_cli, assert_user_error):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    known = load_cache(str(cache_dir)).user_ids[0].item()
    result = run_cli(["inference.py", "recommend", "--data", cache_dir, "--checkpoint", checkpoint,
                      "--users", known, 999_999, "--device", "cpu"])
    assert_user_error(result, "--users", "999999")
    assert result.stdout == ""


def test_checkpoint_of_another_dataset_is_a_user_error(tiny_cache, trained_tiny, tmp_path):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["nb_items"] += 1  # a consistent checkpoint of a dataset with one item more
    items = ckpt["model"]["item_embed.weight"]
    ckpt["model"]["item_embed.weight"] = torch.cat([items, items[:1]])
    torch.save(ckpt, tmp_path / "other.pth")
    user = load_cache(str(cache_dir)).user_ids[0].item()
    with pytest.raises(UserError, match=r"--checkpoint .* items"):
        serving.run_recommend(serving.parse_args(
            ["--data", str(cache_dir), "--checkpoint", str(tmp_path / "other.pth"), "--users", str(user)]))


def check_report(stdout, batch_sizes, precisions, backends=("torch",)):
    report = json.loads(stdout.strip().splitlines()[-1])
    assert {"device", "model", "threads", "results"} <= report.keys()
    assert [(r["batch_size"], r["backend"], r["precision"]) for r in report["results"]] == \
        [(b, backend, p) for b in batch_sizes for backend in backends for p in precisions
         if backend == "torch" or p == "fp32"]  # the ONNX model is fp32
    for r in report["results"]:
        assert r["samples_per_s"] > 0 and 0 < r["latency_p50_ms"] <= r["latency_p99_ms"]
        assert r["precision_run"] == {"fp32": "fp32", "amp": "bf16 autocast"}[r["precision"]]
        assert r["iterations"] == 3
        # samples/s is the batch over the mean latency; of 3 timings the mean lies between p50 / 3 and p99.
        batch_per_s = r["batch_size"] * 1e3
        assert batch_per_s / r["latency_p99_ms"] * 0.999 <= r["samples_per_s"] <= 3 * batch_per_s / r["latency_p50_ms"]
    return report


def test_benchmark_without_data(run_cli):
    result = run_cli(["inference.py", "benchmark", "--users", 50, "--items", 40, "--factors", 8, "--layers", 16, 8,
                      "--batch_sizes", 64, 512, "--precision", "fp32", "amp", "--device", "cpu",
                      "--iterations", 3, "--warmup", 1])
    assert result.returncode == 0, result.stderr
    report = check_report(result.stdout, [64, 512], ["fp32", "amp"])
    assert report["model"] == {"nb_users": 50, "nb_items": 40, "mf_dim": 8, "mlp_layer_sizes": [16, 8],
                               "dropout": 0.5}
    assert "samples/s" in result.stdout  # the table comes before the JSON line


def test_benchmark_of_a_checkpoint(tiny_cache, trained_tiny, capsys, tmp_path):
    cache_dir, checkpoint = tiny_cache, trained_tiny / "model.pth"
    json_path = tmp_path / "bench.json"
    inference.main(["benchmark", "--data", str(cache_dir), "--checkpoint", str(checkpoint), "--batch_sizes", "100",
                    "--precision", "fp32", "--device", "cpu", "--iterations", "3", "--warmup", "0",
                    "--json_path", str(json_path)])
    report = check_report(capsys.readouterr().out, [100], ["fp32"])
    assert report["model"] == torch.load(checkpoint, weights_only=True)["config"]
    # The file is the printed report, marked as ours so that a later run may replace it (and only it).
    assert json.loads(json_path.read_text()) == {"created_by": inference_benchmark.CREATED_BY, **report}


def test_benchmark_compares_torch_and_onnxruntime(capsys):
    import onnxruntime

    inference.main(["benchmark", "--users", "50", "--items", "40", "--factors", "8", "--layers", "16", "8",
                    "--batch_sizes", "1", "300", "--backend", "torch", "onnxruntime", "--precision", "fp32", "amp",
                    "--device", "cpu", "--iterations", "3", "--warmup", "1"])
    out = capsys.readouterr().out
    report = check_report(out, [1, 300], ["fp32", "amp"], ["torch", "onnxruntime"])
    assert report["onnxruntime"] == onnxruntime.__version__ and report["backends"] == ["torch", "onnxruntime"]
    assert "omp_wait_policy" in report and report["cpu_capability"]
    table = out.splitlines()[2:6]
    assert [line.split()[:2] for line in table] == [["1", "torch"], ["1", "torch"], ["1", "onnxruntime"],
                                                    ["300", "torch"]]
    assert "amp rows are torch's" in out


def test_benchmark_bad_flag_is_a_user_error():
    with pytest.raises(UserError, match="--batch_sizes"):
        inference_benchmark.run_benchmark(inference_benchmark.parse_args(["--batch_sizes", "0", "--device", "cpu"]))


def test_the_command_line_names_its_commands(capsys):
    """inference.py dispatches to serving.py, export.py and benchmarks/inference_benchmark.py; anything else is
    one line naming the three."""
    for argv in (["bogus"], [], ["--users", "1"]):
        with pytest.raises(SystemExit) as exit_info:
            inference.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert "command" in err[0] and ("recommend" in err[0] or "required" in err[0]), err
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(name in out for name in ("recommend", "export", "benchmark"))
    with pytest.raises(SystemExit):
        inference.main(["recommend", "--help"])
    assert capsys.readouterr().out.startswith("usage: inference.py recommend")
