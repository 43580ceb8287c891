"""Bad input answered clearly, and no interruption leaves a lie on disk."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, TINY_TRAIN, epochs_of, make_synthetic_cache, train

import convert
import ncf
from cache_format import TENSOR_FILES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_inputs(synthetic_cache, tmp_path_factory):
    """Everything the bad-input table needs: the synthetic cache, a checkpoint of it, another dataset."""
    tmp = tmp_path_factory.mktemp("errors")
    _, _, ck = train(synthetic_cache, tmp, "-e", "1", "--opt_level", "O0")
    other = make_synthetic_cache(tmp / "other", users=300, items=200, per_user=25, negatives=50)
    a_file = tmp / "a_file"
    a_file.write_text("not a folder\n")
    return {"cache": synthetic_cache, "ck": ck / "model.pth", "other": other, "file": a_file, "tmp": tmp}


def broken_cache(cli_inputs, name, damage):
    """A copy of the tiny cache with one thing broken by `damage(folder)`."""
    folder = cli_inputs["tmp"] / f"broken-{name}"
    if not folder.exists():
        shutil.copytree(cli_inputs["cache"], folder)
        damage(folder)
    return folder


def drop_metadata(folder):
    os.remove(folder / "metadata.json")


def wrong_count(folder):
    meta = json.loads((folder / "metadata.json").read_text())
    meta["num_train"] += 1
    (folder / "metadata.json").write_text(json.dumps(meta))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def ncf_argv(inputs, *args):
    return ["ncf.py", "--data", inputs["cache"], "--checkpoint_dir", inputs["tmp"] / "ck-new", *TINY_TRAIN, *args]


def truncated_checkpoint(cli_inputs):
    path = cli_inputs["tmp"] / "truncated.pth"
    if not path.exists():
        path.write_bytes(cli_inputs["ck"].read_bytes()[:1000])
    return path


def not_a_checkpoint(cli_inputs):
    path = cli_inputs["tmp"] / "list.pth"
    torch.save([1, 2, 3], path)
    return path


def foreign_file(cli_inputs, name, folder="foreign"):
    """A folder holding a user's own file named as one ncf.py writes (its content is no checkpoint or log)."""
    path = cli_inputs["tmp"] / folder / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("my notes\n")
    return path


# (case, argv builder, words the one stderr line must contain)
BAD_INPUTS = [
    ("missing cache", lambda w: ncf_argv(w, "--data", w["tmp"] / "nowhere"),
     ["no dataset cache", "prepare_dataset.sh"]),
    ("partial cache", lambda w: ncf_argv(w, "--data", broken_cache(w, "partial", drop_metadata)),
     ["incomplete", "metadata.json"]),
    ("metadata disagrees", lambda w: ncf_argv(w, "--data", broken_cache(w, "count", wrong_count)),
     ["train_ratings.pt", "metadata.json says"]),
    ("truncated .pt", lambda w: ncf_argv(w, "--data", broken_cache(
        w, "trunc", lambda f: truncate(f / "train_ratings.pt"))),
     ["cannot load", "train_ratings.pt"]),
    ("non-torch .pt", lambda w: ncf_argv(w, "--data", broken_cache(
        w, "text", lambda f: (f / "test_negatives.pt").write_text("hello"))), ["cannot load", "test_negatives.pt"]),
    ("checkpoint of another dataset", lambda w: ncf_argv(w, "--data", w["other"], "--mode", "test",
                                                   "--load_checkpoint_path", w["ck"]), ["trained on", "items"]),
    ("checkpoint of another architecture", lambda w: ncf_argv(w, "--load_checkpoint_path", w["ck"], "-f", "8"),
     ["does not fit", "--factors"]),
    ("truncated checkpoint", lambda w: ncf_argv(w, "--mode", "test", "--load_checkpoint_path", truncated_checkpoint(w)),
     ["cannot load", "truncated.pth"]),
    ("not a checkpoint", lambda w: ncf_argv(w, "--mode", "test", "--load_checkpoint_path", not_a_checkpoint(w)),
     ["not a checkpoint written by ncf.py"]),
    ("a text file as the checkpoint", lambda w: ncf_argv(w, "--mode", "test", "--load_checkpoint_path", w["file"]),
     ["a_file", "not a file torch.save wrote"]),
    ("zero epochs", lambda w: ncf_argv(w, "-e", "0"), ["--epochs must be positive"]),
    ("negative batch", lambda w: ncf_argv(w, "-b", "-8"), ["--batch_size must be positive"]),
    ("zero factors", lambda w: ncf_argv(w, "-f", "0"), ["--factors must be positive"]),
    ("zero negatives", lambda w: ncf_argv(w, "-n", "0"), ["--negative_samples must be positive"]),
    ("odd first layer", lambda w: ncf_argv(w, "--layers", "63", "32"), ["--layers", "even", "63"]),
    ("topk beyond candidates", lambda w: ncf_argv(w, "-k", "500"), ["--topk 500", "101 candidates"]),
    ("topk as many as the candidates", lambda w: ncf_argv(w, "-k", "101"), ["--topk 101", "would be 1"]),
    ("topk beyond candidates, full ranking", lambda w: ncf_argv(w, "-k", "500", "--full_ranking"),
     ["--topk 500", "101 candidates"]),
    ("test mode with --resume", lambda w: ncf_argv(w, "--mode", "test", "--resume"), ["--mode test", "--resume"]),
    ("test mode with pretrained branches", lambda w: ncf_argv(w, "--mode", "test", "--init_gmf", w["ck"],
                                                              "--init_mlp", w["ck"]), ["--mode test", "--init_gmf"]),
    ("checkpoints inside the cache", lambda w: ncf_argv(w, "--checkpoint_dir", w["cache"] / "ck"),
     ["--checkpoint_dir", "inside the --data cache"]),
    ("cuda without cuda", lambda w: ncf_argv(w, "--device", "cuda"), ["--device cuda", "--device cpu"]),
    ("test without checkpoint", lambda w: ncf_argv(w, "--mode", "test", "--checkpoint_dir", w["tmp"] / "none"),
     ["--mode test needs a checkpoint"]),
    ("unwritable checkpoint folder", lambda w: ncf_argv(w, "--checkpoint_dir", w["file"] / "ck"),
     ["--checkpoint_dir", "is a file"]),
    ("unwritable log folder", lambda w: ncf_argv(w, "--log_path", w["file"] / "logs" / "log.json"),
     ["--log_path", "is a file"]),
    ("a model.pth ncf.py did not write", lambda w: ncf_argv(w, "--checkpoint_dir", foreign_file(w, "model.pth").parent),
     ["model.pth", "not replaced"]),
    ("a lock file ncf.py did not write", lambda w: ncf_argv(w, "--checkpoint_dir",
                                                           foreign_file(w, ".lock", "foreign-2").parent),
     [".lock", "not taken as a lock"]),
    ("a log ncf.py did not write", lambda w: ncf_argv(w, "--log_path", foreign_file(w, "notes.txt", "foreign-3")),
     ["--log_path", "not replaced"]),
    ("start checkpoint and pretrained branches", lambda w: ncf_argv(w, "--load_checkpoint_path", w["ck"], "--init_gmf",
                                                                    w["ck"], "--init_mlp", w["ck"]),
     ["--load_checkpoint_path and --init_gmf"]),
    ("batch not divisible", lambda w: ncf_argv(w, "-b", "1000", "--grads_accumulated", "3", "--accumulate", "split"),
     ["--batch_size 1000", "--grads_accumulated 3"]),
    ("no such accumulation", lambda w: ncf_argv(w, "--accumulate", "sum"), ["--accumulate", "invalid choice"]),
    ("dropout out of range", lambda w: ncf_argv(w, "--dropout", "1.0"), ["--dropout"]),
    ("zero learning rate", lambda w: ncf_argv(w, "-l", "0"), ["--learning_rate must be positive"]),
    ("fp16 on cpu", lambda w: ncf_argv(w, "--amp", "--amp_dtype", "float16", "--device", "cpu"), ["float16", "CUDA"]),
    ("convert: missing file", lambda w: ["convert.py", "--path", w["tmp"] / "none.csv", "--output", w["tmp"] / "c"],
     ["none.csv"]),
    ("convert: empty file", lambda w: ["convert.py", "--path", w["file"].with_name("empty.csv"), "--output",
                                       w["tmp"] / "c"], ["empty.csv"]),
    ("inference: unknown user", lambda w: ["inference.py", "recommend", "--data", w["cache"], "--checkpoint", w["ck"],
                                           "--users", "99999999"], ["99999999"]),
    ("inference: checkpoint of another dataset", lambda w: ["inference.py", "recommend", "--data", w["other"],
                                                            "--checkpoint", w["ck"], "--users", "1"], ["trained on"]),
    ("prepare: unknown dataset", lambda w: ["prepare_dataset.sh", "ml-5m"], ["ml-5m", "ml-20m"]),
    ("download: unknown dataset", lambda w: ["download_dataset.sh", "ml-5m", w["tmp"] / "dl"], ["ml-5m"]),
]


@pytest.mark.parametrize("case, argv, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(cli_inputs, run_cli, assert_user_error, case, argv, words):
    (cli_inputs["tmp"] / "empty.csv").write_text("")
    command = argv(cli_inputs)  # builds the row's files (a broken cache, a foreign file) before the snapshot
    before = files_of(cli_inputs["tmp"])
    result = run_cli(command, env={"DATA_DIR": str(cli_inputs["tmp"] / "data")})
    assert_user_error(result, *words)
    assert not (cli_inputs["tmp"] / "ck-new").exists(), "an early error left a checkpoint folder"
    assert files_of(cli_inputs["tmp"]) == before  # every file there byte-for-byte as it was, and none added


def files_of(folder):
    """{path: SHA-256} of every file under `folder`."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_pickle_that_runs_code_is_refused(cli_inputs, tmp_path, run_cli, assert_user_error):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    cache = tmp_path / "cache"
    shutil.copytree(cli_inputs["cache"], cache)
    with open(cache / "train_ratings.pt", "wb") as f:
        pickle.dump(Exploit(), f)
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": Exploit(), "config": {}}, checkpoint)
    assert_user_error(run_cli(["ncf.py", "--data", cache, "--checkpoint_dir", tmp_path / "ck"]), "train_ratings.pt")
    assert_user_error(run_cli(["ncf.py", "--data", cli_inputs["cache"], "--mode", "test", "--load_checkpoint_path",
                               checkpoint]), "evil.pth")
    assert not (tmp_path / "pwned").exists()



def start(argv, **kwargs):
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_line(process, prefix):
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}; stderr: {process.stderr.read()[-2000:]}")


def worker_pids(launcher, count, timeout=60):
    """{rank: pid} of the `count` workers that the torchrun process `launcher` started (their RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = {}
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                if parent != launcher:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
                workers[int(env[b"RANK"])] = int(entry)
            except (OSError, ValueError, KeyError, IndexError):
                continue
        if len(workers) == count:
            return workers
        time.sleep(0.1)
    raise AssertionError(f"torchrun {launcher} did not show {count} workers")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_saves_last_checkpoint_and_resume_continues(cli_inputs, tmp_path, nproc):
    """SIGTERM (a scheduler's notice) stops training after the epoch with a last.pth to resume from, and exit
    status 130 on every rank (not a finished run). With 2 processes only rank 1 is signalled (as when one
    node is preempted): the ranks agree to stop after the same epoch, rank 0 says so, and torchrun reports
    both workers' exit code 130 with its status 1, no rank aborting."""
    ck, log = tmp_path / "ck", tmp_path / "log.json"
    args = ["--data", str(cli_inputs["cache"]), "--checkpoint_dir", str(ck), "--log_path", str(log), *TINY_TRAIN,
            "--opt_level", "O0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    job = start([*launcher, str(ROOT / "ncf.py"), *args, "-e", "100"])
    try:
        target = worker_pids(job.pid, 2)[1] if nproc > 1 else job.pid
        wait_for_line(job, "epoch 1 |")
        os.kill(target, signal.SIGTERM)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == (130 if nproc == 1 else 1), err[-3000:]
    if nproc > 1:
        assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", err)) == {"130"}, err[-3000:]  # the two ranks
        assert "terminate called" not in err
    assert "stopped by SIGTERM after epoch" in out
    done = torch.load(ck / "last.pth", weights_only=True)["epoch"]
    assert 1 <= done < 100 and len(epochs_of(log)) == done
    assert f"stopped by SIGTERM after epoch {done};" in out
    result = subprocess.run([*launcher, str(ROOT / "ncf.py"), *args, "-e", str(done + 1), "--resume"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {ck / 'last.pth'} after epoch {done}" in result.stdout
    assert [r["epoch"] for r in epochs_of(log)] == list(range(1, done + 2))


def loads_as_checkpoint(path):
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "config", "epoch"} <= ckpt.keys()
    return ckpt["epoch"]


def test_killed_while_writing_checkpoints_leaves_old_or_new_files(cli_inputs, tmp_path):
    """SIGKILL as soon as a checkpoint's temporary file appears, i.e. in the middle of writing it."""
    ck = tmp_path / "ck"
    # A wide model makes each checkpoint tens of MB, so the kill lands inside the write.
    argv = [sys.executable, str(ROOT / "ncf.py"), "--data", str(cli_inputs["cache"]), "--checkpoint_dir", str(ck),
            *TINY_TRAIN, "-f", "2048", "--opt_level", "O0", "-e", "50"]
    hits = 0
    for round_ in range(2):
        # Round 0 waits for a first last.pth, then kills during the next write; round 1 resumes from it.
        job = start([*argv, *(["--resume"] if round_ else [])])
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and job.poll() is None:
                writing = (ck / "last.pth").exists() and any(".tmp-" in n for n in os.listdir(ck))
                if writing:
                    job.kill()
                    hits += 1
                    break
                time.sleep(0.001)
            job.wait(timeout=60)
        finally:
            if job.poll() is None:
                job.kill()
        assert loads_as_checkpoint(ck / "last.pth") >= 1
        assert loads_as_checkpoint(ck / "model.pth") >= 1
    assert hits == 2


def cache_being_written(cache_root, cache, pid):
    """(folder, its names) while process `pid` is writing a cache under cache_root (some tensor files,
    no metadata.json yet), wherever it writes (its temporary folder, or `cache` itself); else None."""
    try:
        # Folders only: the temporary's .partial proof beside it (a file) carries the pid too.
        folders = [f for f in cache_root.iterdir() if (f == cache or str(pid) in f.name) and f.is_dir()]
        for folder in folders:
            names = os.listdir(folder)
            if any(name.endswith(".pt") for name in names) and "metadata.json" not in names:
                return folder, sorted(names)
    except OSError:  # a folder renamed or removed under our feet
        pass
    return None


def test_killed_convert_leaves_no_cache_that_looks_complete(tmp_path, run_cli):
    """SIGKILL convert.py while it is writing the cache (files written, metadata.json not yet), three
    times: the cache is absent or complete each time, and prepare_dataset.sh then finishes it."""
    import synthetic

    data = tmp_path / "data"
    csv = data / "synthetic" / "ratings.csv"
    synthetic.write_ratings_csv(csv, users=6000, items=3000, interactions_per_user_mean=50, seed=0)
    cache = data / "cache" / "synthetic"
    cache.parent.mkdir(parents=True)
    mid_way = []
    for attempt in range(10):
        job = start([sys.executable, str(ROOT / "convert.py"), "--path", str(csv), "--output", str(cache),
                     "--no_progress"])
        writing = None
        try:
            while job.poll() is None and not writing:
                writing = cache_being_written(cache.parent, cache, job.pid)
                if writing:
                    job.kill()
                time.sleep(0.0002)
        finally:
            job.kill()
            job.wait()
        if cache.exists():
            assert convert.cache_is_complete(cache), f"attempt {attempt}: a partial cache at {cache}"
            for name in TENSOR_FILES:
                assert (cache / name).exists()
        # The kill landed mid-way if what it was writing is still there, unfinished, now that it is dead.
        if writing and writing[0].is_dir() and "metadata.json" not in os.listdir(writing[0]):
            assert writing[0] != cache and not convert.cache_is_complete(writing[0])
            mid_way.append(sorted(os.listdir(writing[0])))
        if len(mid_way) == 3:
            break
    print(f"{attempt + 1} attempts; left mid-way: {mid_way}")
    assert len(mid_way) == 3, f"only {len(mid_way)} of 10 kills landed while the cache was being written"
    result = run_cli(["prepare_dataset.sh", "synthetic"], env={"DATA_DIR": str(data)})
    assert result.returncode == 0, result.stderr
    assert convert.cache_is_complete(cache)
    assert not [n for n in os.listdir(data / "cache") if ".tmp-" in n or ".old-" in n]


def test_grad_scaler_skips_overflowing_steps(synthetic_cache):
    """What fp16 AMP relies on, through ncf.train_step: an overflowing step changes no weight and
    halves the loss scale; the next finite step trains. (A CPU stand-in: large embeddings and a
    huge scale make the scaled fp32 gradients overflow, as fp16 gradients do on a GPU.)"""
    from dataloading import EpochSampler, load_cache
    from devices import choose_precision
    from neumf import NeuMF

    cache = load_cache(synthetic_cache)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    precision = choose_precision("O0", "auto", ctx.device)
    model = NeuMF(cache.num_users, cache.num_items, mf_dim=8, mlp_layer_sizes=(16, 8), dropout=0.0)
    with torch.no_grad():
        model.user_embed.weight.mul_(1e6)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    batches = EpochSampler(cache.train, cache.num_items, 4, "cpu", seed=0).epoch(1, 4096, 0, 1, 1)
    before = [p.detach().clone() for p in model.parameters()]
    ncf.train_step(model, optimizer, scaler, precision, *next(batches), ctx)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**126
    scaler.update(2.0**10)
    ncf.train_step(model, optimizer, scaler, precision, *next(batches), ctx)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
