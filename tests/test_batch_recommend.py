"""Recommendations for every user as a batch job (issue 25.3): `inference.py recommend --all_users | --users_file
--output FILE.csv|FILE.parquet`. The files hold what the per-user `recommend` prints, in original ids and without
training items; the scorer's memory is bounded by users_per_call and the file's by --chunk_users; only files
this command wrote are replaced, and an interruption leaves the previous file, provably ours.

The fast tests score with a numpy source (ties, NaN and inf scores, a user who trained on every item); the
slow ones train the tiny model, export it to ONNX, and run the command line.
"""
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import ROOT

import inference
import recommendation_files
import serving
from cli import UserError

USERS, ITEMS = 23, 17


def numpy_source(users_per_call=4, calls=None):
    """A Source over 23 users x 17 items with equal scores, NaN and +-inf ones; user 5 trained on every item,
    user 0 on none. `calls` (a list) collects the number of users of each scorer call."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 8, size=USERS)
    counts[0], counts[5] = 0, ITEMS
    trained = [np.sort(rng.choice(ITEMS, size=n, replace=False)) for n in counts]
    logits = (rng.integers(0, 4, size=(USERS, ITEMS)) - 2).astype(np.float32)  # many ties
    logits[rng.random((USERS, ITEMS)) < 0.1] = np.nan
    logits[1, 3], logits[2, 4] = np.inf, -np.inf
    maps = {"user_ids": np.arange(USERS, dtype=np.int64) * 10 + 7, "item_ids": np.arange(ITEMS, dtype=np.int64) + 1000,
            "train_ptr": np.concatenate([[0], np.cumsum(counts)]),
            "train_items": np.concatenate(trained).astype(np.int32)}

    def score_users(users):
        assert len(users) <= users_per_call
        if calls is not None:
            calls.append(len(users))
        return logits[users]

    return serving.Source(maps, score_users, users_per_call, {"precision": "fp32"}), logits, trained


def brute_force(logits, trained, user, k):
    """The rule, one user at a time: finite scores of untrained items, highest first, ties in item order."""
    eligible = [i for i in range(ITEMS) if np.isfinite(logits[user, i]) and i not in set(trained[user].tolist())]
    return sorted(eligible, key=lambda i: (-logits[user, i], i))[:k]


def rows_of(path):
    """The rows of a recommendations file as a dict of lists, whatever its format."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    lines = path.read_text().splitlines()
    assert lines[0] == "user,rank,item,score"
    columns = list(zip(*(line.split(",") for line in lines[1:]), strict=True)) or [()] * 4
    return {"user": [int(v) for v in columns[0]], "rank": [int(v) for v in columns[1]],
            "item": [int(v) for v in columns[2]], "score": [float(v) for v in columns[3]]}


@pytest.mark.parametrize("k", [1, 3, 17, 40])
def test_ranking_is_the_rule_whatever_the_chunk(k):
    source, logits, trained = numpy_source()
    users = np.array([3, 0, 5, 1, 2, 22, 3])  # any order, a repeat
    for chunk in (1, 2, 5, 100):
        got = serving.recommend(source, users, k, chunk)
        for user, (items, probs) in zip(users.tolist(), got, strict=True):
            want = brute_force(logits, trained, user, k)
            assert items == [1000 + i for i in want]
            assert probs == pytest.approx(1 / (1 + np.exp(-logits[user, want].astype(np.float64))), rel=1e-12)
    assert got[2] == ([], [])  # user 5 trained on every item


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_file_holds_what_recommend_returns_in_chunks_of_bounded_size(tmp_path, suffix):
    calls = []
    source, _, _ = numpy_source(users_per_call=4, calls=calls)
    users = np.arange(USERS)[::-1].copy()
    output = tmp_path / f"recs{suffix}"
    n, rows, _ = serving.write_recommendations(source, users, 3, 5, str(output), progress=False)
    assert max(calls) <= 4 and sum(calls) == USERS  # the scorer's memory: users_per_call users at most
    got = rows_of(output)
    want = serving.recommend(source, users, 3, chunk_users=1)
    assert n == USERS and rows == len(got["user"]) == sum(len(items) for items, _ in want)
    i = 0
    for user, (items, probs) in zip(users.tolist(), want, strict=True):
        assert got["user"][i : i + len(items)] == [user * 10 + 7] * len(items)
        assert got["rank"][i : i + len(items)] == list(range(1, len(items) + 1))
        assert got["item"][i : i + len(items)] == items
        assert got["score"][i : i + len(items)] == probs  # exactly: CSV writes repr, Parquet float64
        i += len(items)
    if suffix == ".parquet":  # one row group per chunk of 5 users: what the file holds at once
        assert pq.ParquetFile(output).metadata.num_row_groups == 5
        assert recommendation_files.is_our_parquet(str(output))
    else:
        manifest = json.loads((tmp_path / "recs.csv.manifest.json").read_text())
        assert manifest["created_by"] == recommendation_files.CREATED_BY and manifest["rows"] == rows
        assert recommendation_files.is_our_csv(str(output))


def args_of(chunk_users=None, topk=10):
    return Namespace(chunk_users=chunk_users, topk=topk)


def test_chunk_size_bounds_the_recommendations_held_at_once():
    assert serving.chunk_size(args_of(), 26_744, 138_493) == serving.DEFAULT_CHUNK_USERS
    # -k past the item count ranks every item; the default chunk shrinks to hold at most CHUNK_ROWS.
    assert serving.chunk_size(args_of(topk=10**12), 2**20, 138_493) == serving.CHUNK_ROWS // 2**20
    assert serving.chunk_size(args_of(chunk_users=10**15), 100, 1000) == 10**15  # more than all users: one chunk
    with pytest.raises(UserError, match=r"--chunk_users 100,000 .* use --chunk_users 627 or fewer"):
        serving.chunk_size(args_of(chunk_users=100_000, topk=26_744), 26_744, 138_493)


def test_users_file(tmp_path, capsys):
    path = tmp_path / "users.txt"
    path.write_text("# users of the campaign\n17\n\n 3 \n17\n-4\n")
    assert serving.read_users_file(str(path)) == [17, 3, -4]
    assert "1 repeated user id" in capsys.readouterr().err
    for content, words in ((b"17\nuser\n", "line 2 ('user')"), (b"# none\n\n", "holds no user ids"),
                           (b"\xff\xfe1\n", "cannot read")):
        path.write_bytes(content)
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            serving.read_users_file(str(path))
    with pytest.raises(UserError, match="not a file"):
        serving.read_users_file(str(tmp_path))


def test_only_our_files_are_replaced(tmp_path):
    source, _, _ = numpy_source()
    users = np.arange(USERS)
    for suffix in (".csv", ".parquet"):
        output = tmp_path / f"recs{suffix}"
        for _ in range(2):  # the second run replaces what the first wrote
            recommendation_files.check_output(str(output))
            serving.write_recommendations(source, users, 2, 7, str(output), progress=False)
        assert len(rows_of(output)["user"]) == 2 * USERS - 2  # user 5 has nothing to recommend
    # A CSV of ours edited since, a Parquet file of someone else's, a manifest of someone else's: refused.
    edited = tmp_path / "recs.csv"
    edited.write_text(edited.read_text() + "1,1,1,0.5\n")
    (tmp_path / "theirs.parquet").write_bytes((tmp_path / "recs.parquet").read_bytes().replace(
        recommendation_files.CREATED_BY.encode(), b"someone else's writer!"))
    (tmp_path / "new.csv.manifest.json").write_text('{"mine": 1}')
    for name in ("recs.csv", "theirs.parquet", "new.csv"):
        with pytest.raises(UserError, match="not replaced"):
            recommendation_files.check_output(str(tmp_path / name))


def test_an_interrupted_csv_leaves_the_previous_one_provably_ours(tmp_path, monkeypatch):
    """The CSV's manifest is renamed into place first, then the CSV: an interruption between the two leaves
    the previous CSV, which the new manifest names as the one it replaces, so the next run may replace it."""
    source, _, _ = numpy_source()
    users = np.arange(USERS)
    output = tmp_path / "recs.csv"
    serving.write_recommendations(source, users, 2, 7, str(output), progress=False)
    before = output.read_bytes()
    fsyncs, real_fsync = [], os.fsync

    def fsync_then_interrupt(fd):
        fsyncs.append(fd)
        if len(fsyncs) == 2:  # the manifest's fsync was the first: it is in place; now the CSV's
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        serving.write_recommendations(source, users, 3, 7, str(output), progress=False)
    monkeypatch.undo()
    assert output.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "recs.csv", "recs.csv.manifest.json"]
    assert json.loads((tmp_path / "recs.csv.manifest.json").read_text())["topk"] == 3
    recommendation_files.check_output(str(output))  # still ours
    serving.write_recommendations(source, users, 3, 7, str(output), progress=False)
    assert max(rows_of(output)["rank"]) == 3


def test_parquet_needs_pyarrow_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match=r"--output FILE.parquet needs the optional package pyarrow.*pip install"):
        recommendation_files.check_output(str(tmp_path / "recs.parquet"))
    recommendation_files.check_output(str(tmp_path / "recs.csv"))  # CSV needs nothing more
    with pytest.raises(UserError, match=r"\.csv or \.parquet"):
        recommendation_files.check_output(str(tmp_path / "recs.json"))


# ---- the command line, on the tiny dataset's trained model and its ONNX export --------------------------------


@pytest.fixture(scope="module")
def user_ids(exported_tiny):
    """Every user of the tiny dataset, in original ids, as its ONNX export maps them."""
    return np.load(exported_tiny.exports["onnx"] / "id_maps.npz")["user_ids"].tolist()


def per_user(capsys, users, source):
    inference.main(["recommend", *source, "--users", *map(str, users), "--json"])
    return json.loads(capsys.readouterr().out)["recommendations"]


def assert_file_equals(path, recommendations):
    rows, i = rows_of(path), 0
    for r in recommendations:
        n = len(r["items"])
        assert rows["user"][i : i + n] == [r["user"]] * n and rows["item"][i : i + n] == r["items"]
        assert rows["score"][i : i + n] == r["scores"]
        i += n
    assert i == len(rows["user"])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["checkpoint", "onnx"])
def test_every_user_in_a_file_equals_recommend_per_user(exported_tiny, user_ids, tmp_path, capsys, which):
    source = (["--data", str(exported_tiny.cache_dir), "--checkpoint", str(exported_tiny.checkpoint), "--device", "cpu"]
              if which == "checkpoint" else ["--model", str(exported_tiny.exports["onnx"])])
    want = per_user(capsys, user_ids, source)
    for chunk, suffix in (("7", ".parquet"), ("1000", ".csv")):
        output = tmp_path / f"all{suffix}"
        inference.main(["recommend", *source, "--all_users", "--output", str(output), "--chunk_users", chunk])
        assert f"of {len(user_ids)} users" in capsys.readouterr().out
        assert_file_equals(output, want)
    # A list of users from a file: its order, each once.
    chosen = user_ids[::-7][:20]
    (tmp_path / "users.txt").write_text("\n".join(map(str, chosen + chosen[:3])) + "\n")
    inference.main(["recommend", *source, "--users_file", str(tmp_path / "users.txt"), "--output",
                    str(tmp_path / "some.parquet"), "-k", "4"])
    capsys.readouterr()
    assert_file_equals(tmp_path / "some.parquet", [{**r, "items": r["items"][:4], "scores": r["scores"][:4]}
                                                   for r in per_user(capsys, chosen, source)])
    metadata = json.loads(pq.read_metadata(tmp_path / "some.parquet").metadata[b"recommendations"])
    assert metadata["topk"] == 4 and metadata["users"] == 20 and metadata["dataset"]["num_users"] == len(user_ids)


@pytest.mark.slow
def test_a_progress_bar_on_a_terminal(exported_tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    argv = ["recommend", "--model", str(exported_tiny.exports["onnx"]), "--all_users", "--output",
            str(tmp_path / "r.csv")]
    inference.main(argv)
    err = capsys.readouterr().err
    assert "recommend: 100%" in err and "300/300" in err and "user/s" in err
    inference.main([*argv, "--no_progress"])
    assert capsys.readouterr().err == ""


# A batch job from an ONNX export, in a fresh interpreter: it must run without torch or the training code.
SERVE = """
import json, runpy, sys
sys.argv = ["inference.py", *sys.argv[1:]]
runpy.run_path("inference.py", run_name="__main__")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {
    "torch", "pandas", "ncf", "neumf", "dataloading", "checkpoint", "devices", "cpu_kernels", "synthetic", "convert",
    "onnx", "onnxscript", "export"})), file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_batch_from_onnx_imports_no_torch(exported_tiny, user_ids, tmp_path, suffix):
    output = tmp_path / f"recs{suffix}"
    result = subprocess.run([sys.executable, "-c", SERVE, "recommend", "--model", str(exported_tiny.exports["onnx"]),
                             "--all_users", "--output", str(output)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []
    assert len(rows_of(Path(output))["user"]) == 10 * len(user_ids)


def test_a_user_given_twice_in_users_is_written_once_and_said(exported_tiny, user_ids, tmp_path, capsys):
    """As --users_file does (hostile pass U18: --users 1 2 1 wrote user 1 twice without a word)."""
    first, second = user_ids[:2]
    inference.main(["recommend", "--model", str(exported_tiny.exports["onnx"]), "--users", str(first), str(second),
                    str(first), "--output", str(tmp_path / "u.csv"), "-k", "3"])
    assert "1 repeated user id(s) in --users" in capsys.readouterr().err
    assert rows_of(tmp_path / "u.csv")["user"] == [first] * 3 + [second] * 3
