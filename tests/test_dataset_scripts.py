"""prepare_dataset.sh, download_dataset.sh and verify_dataset.sh, with MovieLens served from 127.0.0.1."""
import functools
import hashlib
import http.server
import json
import os
import re
import threading
import zipfile

import pytest
from helpers import ROOT

import convert
from cache_format import TENSOR_FILES

pytestmark = pytest.mark.slow  # every test here runs the shell scripts


def test_prepare_synthetic_then_rerun_returns_at_once(tmp_path, run_cli):
    data_dir = tmp_path / "elsewhere"
    first = run_cli(["prepare_dataset.sh", "synthetic"], env={"DATA_DIR": str(data_dir)}, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    cache = data_dir / "cache" / "synthetic"
    assert sorted(p.name for p in cache.iterdir()) == sorted([*TENSOR_FILES, "metadata.json"])
    assert convert.cache_is_complete(cache)
    assert not (tmp_path / "data").exists()  # DATA_DIR moved it

    again = run_cli(["prepare_dataset.sh", "synthetic"], env={"DATA_DIR": str(data_dir)}, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert "wrote" not in again.stdout


@pytest.mark.parametrize("script", ["prepare_dataset.sh", "download_dataset.sh", "verify_dataset.sh"])
def test_unknown_dataset_name(tmp_path, run_cli, assert_user_error, script):
    args = [script, "ml-2m"] + (["x.zip"] if script == "verify_dataset.sh" else [])
    result = run_cli(args, env={"DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    assert_user_error(result, "ml-2m", "ml-20m", "ml-1m", "ml-100k")
    assert list(tmp_path.iterdir()) == []


def ml1m_zip(path):
    """A small zip laid out like GroupLens's ml-1m.zip: 40 users x 25 of 150 items, enough for 100 negatives."""
    lines = [f"{user}::{(user * 7 + k * 5) % 150 + 1}::{k % 5 + 1}::{1000 + k}"
             for user in range(1, 41) for k in range(25)]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-1m/ratings.dat", "\n".join(lines) + "\n")
        archive.writestr("ml-1m/README", "test data\n")
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def movielens_server(tmp_path):
    """Serve tmp_path/served/ over HTTP on 127.0.0.1 (a free port); yield (folder, base url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _leftovers(data_dir):
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_download_rejects_a_bad_zip_then_succeeds(tmp_path, run_cli, movielens_server, damage):
    served, url = movielens_server
    good = tmp_path / "good.zip"
    env = {"MOVIELENS_URL": url, "MOVIELENS_MD5": ml1m_zip(good), "DATA_DIR": str(tmp_path / "data")}
    data = good.read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else data[:100] + b"X" + data[101:]
    (served / "ml-1m.zip").write_bytes(bad)

    failed = run_cli(["download_dataset.sh", "ml-1m"], env=env, cwd=tmp_path)
    assert failed.returncode == 1
    assert "MD5" in failed.stderr and "rerun" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert _leftovers(tmp_path / "data") == []  # nothing a rerun would take as good

    (served / "ml-1m.zip").write_bytes(data)
    prepared = run_cli(["prepare_dataset.sh", "ml-1m"], env=env, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert (tmp_path / "data" / "ml-1m" / "ratings.dat").exists()
    metadata = json.loads((tmp_path / "data" / "cache" / "ml-1m" / "metadata.json").read_text())
    assert (metadata["format"], metadata["num_users"], metadata["num_items"]) == ("ml-1m", 40, 150)

    (served / "ml-1m.zip").unlink()  # reruns must not need the network
    download_again = run_cli(["download_dataset.sh", "ml-1m"], env=env, cwd=tmp_path)
    assert download_again.returncode == 0
    assert "skipping" in download_again.stdout
    prepare_again = run_cli(["prepare_dataset.sh", "ml-1m"], env=env, cwd=tmp_path)
    assert prepare_again.returncode == 0
    assert "already complete" in prepare_again.stdout


def test_missing_file_on_the_server(tmp_path, run_cli, movielens_server):
    _, url = movielens_server
    result = run_cli(["download_dataset.sh", "ml-100k"], env={"MOVIELENS_URL": url}, cwd=tmp_path)
    assert result.returncode == 1
    assert "could not download" in result.stderr and "MOVIELENS_URL" in result.stderr
    assert _leftovers(tmp_path / "data") == []


def test_zip_without_the_ratings_file(tmp_path, run_cli, movielens_server):
    served, url = movielens_server
    with zipfile.ZipFile(served / "ml-100k.zip", "w") as archive:
        archive.writestr("ml-100k/u.item", "1|Toy Story\n")
    md5 = hashlib.md5((served / "ml-100k.zip").read_bytes()).hexdigest()
    result = run_cli(["download_dataset.sh", "ml-100k", tmp_path / "data"],
                     env={"MOVIELENS_URL": url, "MOVIELENS_MD5": md5}, cwd=tmp_path)
    assert result.returncode == 1
    assert "ml-100k/u.data" in result.stderr
    assert _leftovers(tmp_path / "data") == ["ml-100k.zip"]  # verified, so kept; no ml-100k/ folder


def test_verify_reports_a_mismatch(tmp_path, run_cli):
    path = tmp_path / "ml-20m.zip"
    path.write_bytes(b"not the real thing")
    result = run_cli(["verify_dataset.sh", "ml-20m", path])
    assert result.returncode == 1
    assert "cd245b17a1ae2cc31bb14903e1204af3" in result.stderr
    ok = run_cli(["verify_dataset.sh", "ml-20m", path],
                 env={"MOVIELENS_MD5": hashlib.md5(b"not the real thing").hexdigest()})
    assert ok.returncode == 0, ok.stderr


def synthetic_data_dir(data_dir):
    """DATA_DIR holding a small synthetic ratings.csv and its cache, as prepare_dataset.sh leaves them."""
    import synthetic

    csv = data_dir / "synthetic" / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=300, items=200, interactions_per_user_mean=30)
    cache = data_dir / "cache" / "synthetic"
    convert.main(["--path", str(csv), "--output", str(cache), "--no_progress"])
    return cache


def old_format(cache):
    metadata = json.loads((cache / "metadata.json").read_text())
    del metadata["files"]
    metadata["format_version"] = 1
    (cache / "metadata.json").write_text(json.dumps(metadata))


def damaged_file(cache):
    path = cache / "test_negatives.pt"
    path.write_bytes(path.read_bytes()[:-100])


def missing_file(cache):
    (cache / "user_ids.pt").unlink()


@pytest.mark.parametrize("damage", [old_format, damaged_file, missing_file], ids=lambda f: f.__name__)
def test_prepare_rebuilds_the_cache_the_loader_refuses(tmp_path, run_cli, damage):
    """The loader's message says to run ./prepare_dataset.sh NAME; doing so must repair the cache, not
    report it complete (convert.py --check verifies the version and checksums)."""
    from cli import UserError
    from dataloading import load_cache

    cache = synthetic_data_dir(tmp_path / "data")
    damage(cache)
    with pytest.raises(UserError, match=r"\./prepare_dataset\.sh NAME"):
        load_cache(str(cache))
    result = run_cli(["prepare_dataset.sh", "synthetic"], env={"DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "already complete" not in result.stdout and "rebuilding" in result.stdout
    assert load_cache(str(cache)).num_users == 300
    assert sorted(p.name for p in cache.iterdir()) == sorted([*TENSOR_FILES, "metadata.json"])


def test_a_folder_without_metadata_is_moved_away_then_rebuilt(tmp_path, run_cli, assert_user_error):
    """Nothing proves convert.py wrote a folder without metadata.json: prepare refuses to replace it, and
    the loader's advice (move it away, then prepare) works."""
    from cli import UserError
    from dataloading import load_cache

    cache = synthetic_data_dir(tmp_path / "data")
    (cache / "metadata.json").unlink()
    with pytest.raises(UserError, match=r"move .* away") as error:
        load_cache(str(cache))
    assert "./prepare_dataset.sh NAME" in str(error.value)
    env = {"DATA_DIR": str(tmp_path / "data")}
    refused = run_cli(["prepare_dataset.sh", "synthetic"], env=env, cwd=tmp_path)
    assert_user_error(refused, str(cache), "move it away")
    assert sorted(p.name for p in cache.iterdir()) == sorted(TENSOR_FILES)  # untouched
    cache.rename(tmp_path / "moved-away")
    rebuilt = run_cli(["prepare_dataset.sh", "synthetic"], env=env, cwd=tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert load_cache(str(cache)).num_users == 300


# The MD5 sums GroupLens publishes next to each zip (files.grouplens.org/datasets/movielens/NAME.zip.md5).
PUBLISHED_MD5 = {
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}
# Not confirmed offline: what verify_dataset.sh holds, with MOVIELENS_MD5 documented as the way round it.
ML32M_MD5 = "d472be332d4daa821edc399621853b57"
RATINGS_FILE = {"ml-20m": "ratings.csv", "ml-25m": "ratings.csv", "ml-32m": "ratings.csv", "ml-1m": "ratings.dat",
                "ml-100k": "u.data"}


@pytest.mark.parametrize("name", sorted(RATINGS_FILE))
def test_the_built_in_md5_refuses_a_download_that_differs(tmp_path, run_cli, movielens_server, monkeypatch, name):
    """No MOVIELENS_MD5: a zip laid out as NAME.zip but with other bytes is refused, and nothing is kept.
    With its MD5 passed, the same zip is accepted: the checksum was the only thing wrong."""
    monkeypatch.delenv("MOVIELENS_MD5", raising=False)
    served, url = movielens_server
    served_zip = served / f"{name}.zip"
    with zipfile.ZipFile(served_zip, "w") as archive:
        archive.writestr(f"{name}/{RATINGS_FILE[name]}", "1,2,3.0,4\n")
    env = {"MOVIELENS_URL": url, "DATA_DIR": str(tmp_path / "data")}
    refused = run_cli(["download_dataset.sh", name], env=env, cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "failed its MD5 check" in refused.stderr and "Traceback" not in refused.stderr
    assert _leftovers(tmp_path / "data") == []

    md5 = hashlib.md5(served_zip.read_bytes()).hexdigest()
    accepted = run_cli(["download_dataset.sh", name], env={**env, "MOVIELENS_MD5": md5}, cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert (tmp_path / "data" / name / RATINGS_FILE[name]).is_file()


@pytest.mark.parametrize("name, md5", [*sorted(PUBLISHED_MD5.items()), ("ml-32m", ML32M_MD5)])
def test_the_built_in_checksums_are_grouplens_published_ones(tmp_path, run_cli, monkeypatch, name, md5):
    monkeypatch.delenv("MOVIELENS_MD5", raising=False)
    other = tmp_path / f"{name}.zip"
    other.write_bytes(b"another file")
    result = run_cli(["verify_dataset.sh", name, other])
    assert result.returncode == 1
    assert f"expected {md5}:" in result.stderr, result.stderr


def test_the_readme_names_the_override_for_the_unconfirmed_ml32m_checksum():
    """ml-32m's checksum could not be confirmed offline: README.md says so, in the sentence that documents
    MOVIELENS_MD5 as the override (which the download test above shows working for ml-32m)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    sentences = [s for s in re.split(r"(?<=\.) ", readme) if "MOVIELENS_MD5" in s and "ml-32m" in s]
    assert sentences and all(re.search(r"overrid|replace", s) for s in sentences), sentences


# ---- the recipe's command lines: positional folders, PASSED/FAILED, unzip -----------------------------------


def small_synthetic(data_dir):
    """DATA_DIR/synthetic/ratings.csv, small: prepare_dataset.sh synthetic converts it without generating."""
    import synthetic

    csv = data_dir / "synthetic" / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=300, items=200, interactions_per_user_mean=30)
    return csv


def test_prepare_takes_the_recipes_positional_folders(tmp_path, run_cli, movielens_server):
    """`./prepare_dataset.sh ml-1m DATA_DIR [CACHE_DIR]`, as in the recipe: the zip and ratings under DATA_DIR,
    the cache in DATA_DIR/cache/NAME or CACHE_DIR; $DATA_DIR is not used when the folder is given. A CACHE_DIR
    holding another dataset's cache, or one without the asked split, is rebuilt, never called complete."""
    served, url = movielens_server
    env = {"MOVIELENS_URL": url, "MOVIELENS_MD5": ml1m_zip(served / "ml-1m.zip"), "DATA_DIR": str(tmp_path / "unused")}
    data = tmp_path / "raw"
    first = run_cli(["prepare_dataset.sh", "ml-1m", data], env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (data / "ml-1m.zip").is_file() and convert.cache_is_complete(data / "cache" / "ml-1m")
    assert not (tmp_path / "unused").exists()

    cache = tmp_path / "elsewhere" / "ml-1m"
    named = run_cli(["prepare_dataset.sh", "ml-1m", data, cache], env=env, cwd=tmp_path)
    assert named.returncode == 0, named.stderr
    assert json.loads((cache / "metadata.json").read_text())["format"] == "ml-1m"
    again = run_cli(["prepare_dataset.sh", "ml-1m", data, cache], env=env, cwd=tmp_path)
    assert "already complete" in again.stdout, again.stdout + again.stderr

    small_synthetic(data)
    other = run_cli(["prepare_dataset.sh", "synthetic", data, cache], env=env, cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert "already complete" not in other.stdout and "rebuilding" in other.stdout
    assert json.loads((cache / "metadata.json").read_text())["num_users"] == 300
    split = run_cli(["prepare_dataset.sh", "synthetic", data, cache, "--validation"], env=env, cwd=tmp_path)
    assert split.returncode == 0, split.stderr
    assert json.loads((cache / "metadata.json").read_text())["validation"] is True


BAD_PREPARE = {
    "too many folders": (["ml-1m", "a", "b", "c"], ["too many arguments", "CACHE_DIR"]),
    "unknown option": (["ml-1m", "--valid_negative"], ["unknown option", "--valid_negative", "--validation"]),
    "data folder is a file": (["synthetic", "afile"], ["afile", "is a file"]),
    "cache folder is a file": (["synthetic", "data", "afile"], ["afile", "is a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PREPARE))
def test_prepare_refuses_a_bad_command_line_in_one_line(tmp_path, run_cli, assert_user_error, case):
    args, words = BAD_PREPARE[case]
    (tmp_path / "afile").write_text("mine")
    result = run_cli(["prepare_dataset.sh", *args], env={"DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    assert_user_error(result, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "mine"


def test_verify_prints_passed_or_failed_as_the_recipe(tmp_path, run_cli):
    """The recipe's `./verify_dataset.sh ml-1m`, run where the zip is, prints PASSED or FAILED; the exit
    status says the same (0, 1), and the reason for FAILED is on stderr."""
    md5 = ml1m_zip(tmp_path / "ml-1m.zip")
    passed = run_cli(["verify_dataset.sh", "ml-1m"], env={"MOVIELENS_MD5": md5}, cwd=tmp_path)
    assert (passed.returncode, passed.stdout, passed.stderr) == (0, "PASSED\n", "")
    failed = run_cli(["verify_dataset.sh", "ml-1m"], env={"MOVIELENS_MD5": "0" * 32}, cwd=tmp_path)
    assert (failed.returncode, failed.stdout) == (1, "FAILED\n")
    assert f"expected {'0' * 32}" in failed.stderr
    missing = run_cli(["verify_dataset.sh"], cwd=tmp_path)  # the recipe's default: ml-20m.zip, here
    assert (missing.returncode, missing.stdout) == (1, "FAILED\n")
    assert "ml-20m.zip does not exist" in missing.stderr
    unreadable = tmp_path / "ml-100k.zip"
    unreadable.mkdir()
    folder = run_cli(["verify_dataset.sh", "ml-100k", unreadable], cwd=tmp_path)
    assert (folder.returncode, folder.stdout) == (1, "FAILED\n")


def path_without(tmp_path, command):
    """A PATH with every command of the current one but `command` (links in a fresh folder)."""
    bin_dir = tmp_path / f"bin-without-{command}"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            if name != command and not (bin_dir / name).exists() and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def test_download_without_unzip_extracts_with_python(tmp_path, run_cli, movielens_server):
    served, url = movielens_server
    env = {"MOVIELENS_URL": url, "MOVIELENS_MD5": ml1m_zip(served / "ml-1m.zip"), "DATA_DIR": str(tmp_path / "data"),
           "PATH": path_without(tmp_path, "unzip")}
    result = run_cli(["download_dataset.sh", "ml-1m"], env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "extracting with python's zipfile" in result.stdout
    assert (tmp_path / "data" / "ml-1m" / "ratings.dat").read_bytes().startswith(b"1::")
    assert _leftovers(tmp_path / "data") == ["ml-1m", "ml-1m.zip"]


def test_the_image_installs_unzip_as_the_recipes_does():
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = [line for line in re.split(r"\n(?=\S)", dockerfile) if line.startswith("RUN ")]
    assert any(re.search(r"apt-get install -y\b.*\bunzip\b", " ".join(run.split())) for run in runs), runs
