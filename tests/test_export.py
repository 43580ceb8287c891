"""inference.py export and serving (export.py, serving.py): exported scores equal the checkpoint's,
recommendations from an export equal those from the checkpoint, the output folder rule, and the optional
extras."""
import json
import shutil
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import ROOT

import checkpoint
import export
import inference
import serving
from cli import EnvironmentFailure

CPU = torch.device("cpu")
PAIRS = 4096


@pytest.fixture(scope="module")
def checkpoint_model(exported_tiny, loaded_tiny_cache):
    """The model of the checkpoint that exported_tiny's exports were made from."""
    return checkpoint.load_model(str(exported_tiny.checkpoint), loaded_tiny_cache, CPU)[0]


def random_pairs(cache, n=PAIRS, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(cache.num_users, size=n), rng.integers(cache.num_items, size=n)


def checkpoint_logits(model, users, items):
    with torch.no_grad():
        return model(torch.from_numpy(users), torch.from_numpy(items)).numpy()


def assert_equal_scores(model, score, cache):
    users, items = random_pairs(cache)
    want = checkpoint_logits(model, users, items)
    assert want.std() > 0.01  # logits that differ, or equality to 1e-5 would prove little
    np.testing.assert_allclose(score(users, items), want, rtol=0, atol=1e-5)
    for n in (1, 3, 1000):  # the batch is dynamic, down to one pair
        np.testing.assert_allclose(score(users[:n], items[:n]), want[:n], rtol=0, atol=1e-5)


def test_onnx_export_scores_equal_the_checkpoint(exported_tiny, loaded_tiny_cache, checkpoint_model):
    path = exported_tiny.exports["onnx"] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["user", "item"] and [o.name for o in graph.output] == ["logit"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in graph.input)  # a named, dynamic batch
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert_equal_scores(checkpoint_model, lambda u, i: session.run(None, {"user": u, "item": i})[0],
                        loaded_tiny_cache)


def test_torch_export_program_scores_equal_the_checkpoint(exported_tiny, loaded_tiny_cache, checkpoint_model):
    module = torch.export.load(str(exported_tiny.exports["torch-export"] / "model.pt2")).module()

    def score(users, items):
        with torch.no_grad():
            return module(torch.from_numpy(users), torch.from_numpy(items)).numpy()

    assert_equal_scores(checkpoint_model, score, loaded_tiny_cache)


def recommendations(capsys, users, *source):
    inference.main(["recommend", *source, "--users", *map(str, users), "--topk", "10", "--json"])
    return json.loads(capsys.readouterr().out)["recommendations"]


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_recommend_from_an_export_equals_the_checkpoints(exported_tiny, loaded_tiny_cache, capsys, fmt):
    users = loaded_tiny_cache.user_ids[::6].tolist()  # 50 users
    want = recommendations(capsys, users, "--data", str(exported_tiny.cache_dir), "--checkpoint",
                           str(exported_tiny.checkpoint), "--device", "cpu")
    got = recommendations(capsys, users, "--model", str(exported_tiny.exports[fmt]))
    assert [r["user"] for r in got] == users
    for mine, theirs in zip(got, want, strict=True):
        assert len(mine["items"]) == 10 and mine["items"] == theirs["items"]
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-6)


def test_manifest_and_id_maps(exported_tiny, loaded_tiny_cache):
    ckpt = torch.load(exported_tiny.checkpoint, weights_only=True)
    for fmt, folder in exported_tiny.exports.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["created_by"] == "inference.py export" and manifest["format"] == fmt
        assert manifest["model"] == ckpt["config"] and manifest["dataset"] == ckpt["dataset"]
        assert manifest["checkpoint"]["hr"] == ckpt["hr"] and manifest["checkpoint"]["topk"] == 10
        assert manifest["torch"] == torch.__version__
        assert manifest["check"]["pairs"] == PAIRS and manifest["check"]["max_abs_logit_diff"] <= 1e-5
        assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], "manifest.json"])
        assert manifest["model_file"] in manifest["files"]
    assert json.loads((exported_tiny.exports["onnx"] / "manifest.json").read_text())["onnx_opset"] >= 17
    with np.load(exported_tiny.exports["onnx"] / "id_maps.npz", allow_pickle=False) as maps:
        assert np.array_equal(maps["user_ids"], loaded_tiny_cache.user_ids.numpy())
        assert np.array_equal(maps["item_ids"], loaded_tiny_cache.item_ids.numpy())
        train = loaded_tiny_cache.train.numpy()
        for user in (0, 17, loaded_tiny_cache.num_users - 1):
            trained = maps["train_items"][maps["train_ptr"][user] : maps["train_ptr"][user + 1]]
            assert np.array_equal(trained, train[train[:, 0] == user, 1])


def test_recommend_skips_training_items_and_non_finite_scores():
    maps = {"user_ids": np.array([10, 20]), "item_ids": np.array([100, 101, 102, 103, 104]),
            "train_ptr": np.array([0, 2, 3]), "train_items": np.array([0, 3, 1], dtype=np.int32)}
    logits = np.array([9.0, 1.0, np.nan, 8.0, 1.0], dtype=np.float32)

    def score(users, items):
        return logits[items] + users.astype(np.float32) * 0

    source = serving.Source(maps, serving.rows_of_pairs(score, 5), 1, {})
    (items0, probs0), (items1, _) = serving.recommend(source, np.array([0, 1]), 10)
    assert items0 == [101, 104]  # not 100 nor 103 (trained), not 102 (NaN); a tie keeps item order
    assert probs0 == pytest.approx([1 / (1 + np.exp(-1.0))] * 2)
    assert items1 == [100, 103, 104]


def fails(capsys, argv, *words):
    """inference.main(argv) ends as a user error: exit status 2 and one stderr line with every word."""
    with pytest.raises(SystemExit) as exit_info:
        inference.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def export_argv(exported, output, fmt="onnx", data=None):
    return ["export", "--checkpoint", str(exported.checkpoint), "--data", str(data or exported.cache_dir),
            "--format", fmt, "--output", str(output)]


@pytest.mark.parametrize("content", ["notes.txt", "manifest-not-ours", "ours-plus-a-file", "subfolder"])
def test_export_never_replaces_a_foreign_folder(exported_tiny, tmp_path, capsys, content):
    output = tmp_path / "out"
    if content == "ours-plus-a-file":
        shutil.copytree(exported_tiny.exports["onnx"], output)
        (output / "notes.txt").write_text("mine")
    elif content == "manifest-not-ours":
        output.mkdir()
        (output / "manifest.json").write_text(json.dumps({"created_by": "someone else"}))
    elif content == "subfolder":
        (output / "model.onnx").mkdir(parents=True)
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine")
    before = sorted(p.name for p in output.iterdir())
    # The output is checked before any work: a missing --data is not what is reported.
    fails(capsys, export_argv(exported_tiny, output, data=tmp_path / "no-such-cache"), "--output", "not an export")
    assert sorted(p.name for p in output.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_export_refuses_a_file_and_a_folder_holding_the_input(exported_tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(capsys, export_argv(exported_tiny, tmp_path / "file"), "--output", "not a folder")
    fails(capsys, export_argv(exported_tiny, exported_tiny.checkpoint.parent), "--output",
          "holds the input --checkpoint")


def test_export_replaces_its_own_export_and_an_empty_folder(exported_tiny, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(exported_tiny.exports["onnx"], output)
    inference.main(export_argv(exported_tiny, output, "torch-export"))
    assert sorted(p.name for p in output.iterdir()) == ["id_maps.npz", "manifest.json", "model.pt2"]
    assert json.loads((output / "manifest.json").read_text())["format"] == "torch-export"
    (tmp_path / "empty").mkdir()
    inference.main(export_argv(exported_tiny, tmp_path / "empty", "torch-export"))
    assert (tmp_path / "empty" / "model.pt2").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]  # no temporary left
    assert "exported" in capsys.readouterr().out


def test_a_failed_export_leaves_the_previous_one_and_no_temporary(exported_tiny, tmp_path, monkeypatch):
    output = tmp_path / "out"
    shutil.copytree(exported_tiny.exports["onnx"], output)
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def export_then_fail(model, path):
        with open(path, "wb") as f:
            f.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export.EXPORTERS, "torch-export", export_then_fail)
    with pytest.raises(EnvironmentFailure, match="No space left"):
        export.run_export(export.parse_args(export_argv(exported_tiny, output, "torch-export")[1:]))
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_export_that_scores_differently_is_refused():
    def reference(users, items):
        return (users + items).astype(np.float32)

    assert export.check_export(reference, reference, 5, 7) == 0.0
    with pytest.raises(EnvironmentFailure, match="differ"):
        export.check_export(reference, lambda u, i: reference(u, i) + 1e-3, 5, 7)


def test_a_changed_export_file_is_refused(exported_tiny, loaded_tiny_cache, tmp_path, capsys):
    output = tmp_path / "out"
    shutil.copytree(exported_tiny.exports["onnx"], output)
    maps = output / "id_maps.npz"
    data = bytearray(maps.read_bytes())
    data[len(data) // 2] ^= 1  # one bit: still a valid zip, but not the export's
    maps.write_bytes(bytes(data))
    user = str(loaded_tiny_cache.user_ids[0].item())
    fails(capsys, ["recommend", "--model", str(output), "--users", user], "id_maps.npz", "SHA-256")
    (output / "manifest.json").unlink()
    fails(capsys, ["recommend", "--model", str(output), "--users", user], "no manifest.json")


def test_recommend_takes_an_export_or_a_checkpoint(exported_tiny, loaded_tiny_cache, capsys):
    user = str(loaded_tiny_cache.user_ids[0].item())
    fails(capsys, ["recommend", "--model", str(exported_tiny.exports["onnx"]), "--data", str(exported_tiny.cache_dir),
                   "--users", user], "--model", "--data")
    fails(capsys, ["recommend", "--checkpoint", str(exported_tiny.checkpoint), "--users", user], "--model", "--data")
    fails(capsys, ["recommend", "--model", str(exported_tiny.exports["onnx"]), "--users", "999999"], "--users",
          "999999")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx", "onnxscript"])
def test_missing_extras_are_a_one_line_error(exported_tiny, loaded_tiny_cache, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    output = tmp_path / "out"
    fails(capsys, export_argv(exported_tiny, output), missing, "pip install -r requirements-export.txt")
    assert not output.exists()
    fails(capsys, ["benchmark", "--backend", "onnxruntime", "--users", "5", "--items", "5", "--device", "cpu"],
          missing, "pip install")
    if missing == "onnxruntime":
        user = str(loaded_tiny_cache.user_ids[0].item())
        fails(capsys, ["recommend", "--model", str(exported_tiny.exports["onnx"]), "--users", user], missing,
              "pip install")


# The serving path, in a fresh interpreter: it must answer without torch or the training code.
SERVE = """
import json, runpy, sys
sys.argv = ["inference.py", *sys.argv[1:]]
runpy.run_path("inference.py", run_name="__main__")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {
    "torch", "pandas", "ncf", "neumf", "dataloading", "checkpoint", "devices", "cpu_kernels", "synthetic", "convert",
    "onnx", "onnxscript"})), file=sys.stderr)
"""


@pytest.mark.slow
def test_recommend_from_onnx_imports_no_torch_nor_training_code(exported_tiny, loaded_tiny_cache, capsys):
    import subprocess

    users = [str(u) for u in loaded_tiny_cache.user_ids[:20].tolist()]
    result = subprocess.run([sys.executable, "-c", SERVE, "recommend", "--model", str(exported_tiny.exports["onnx"]),
                             "--users", *users, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    inference.main(["recommend", "--data", str(exported_tiny.cache_dir), "--checkpoint", str(exported_tiny.checkpoint),
                    "--users", *users, "--json", "--device", "cpu"])
    want = json.loads(capsys.readouterr().out)["recommendations"]
    got = json.loads(result.stdout)["recommendations"]
    assert [r["items"] for r in got] == [r["items"] for r in want]


@pytest.mark.slow
def test_export_command_line(exported_tiny, tmp_path, run_cli, assert_user_error):
    output = tmp_path / "served"
    result = run_cli(["inference.py", *export_argv(exported_tiny, output)])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the exporter's own logging and warnings are kept off the command line
    assert result.stdout.startswith(f"exported {exported_tiny.checkpoint} (onnx) to {output}")
    assert json.loads((output / "manifest.json").read_text())["format"] == "onnx"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert_user_error(run_cli(["inference.py", *export_argv(exported_tiny, tmp_path / "foreign")]), "--output",
                      "not replaced")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
