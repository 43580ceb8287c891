"""torchrun, torch.distributed.launch and multi-node runs on CPU (gloo)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT, TINY_TRAIN, epochs_of, event_of, train

pytestmark = pytest.mark.slow

# Dropout 0 and a fixed seed: N processes must reproduce one process with the same global batch.
PARITY = ["-e", "2", "-b", "8192", "--dropout", "0", "--opt_level", "O0", "--seed", "5"]


def torchrun_cmd(*launcher_args):
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, str(ROOT / "ncf.py")]


def run(cmd, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def ncf_args(cache, out, *extra):
    out.mkdir(parents=True, exist_ok=True)
    return ["--data", str(cache), "--checkpoint_dir", str(out / "ck"), "--log_path", str(out / "log.json"),
            *TINY_TRAIN, *map(str, extra)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(synthetic_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun2")
    result = run(torchrun_cmd("--standalone", "--nproc_per_node=2") + ncf_args(synthetic_cache, out, *PARITY))
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def figures(log):
    return [(r["loss"], r["hr"], r["ndcg"]) for r in epochs_of(log)]


def test_two_processes_reproduce_one(two_process_run, synthetic_cache, tmp_path):
    result, out = two_process_run
    assert "world size 2" in result.stdout and "per rank 4,096" in result.stdout
    two = epochs_of(out / "log.json")
    _, one_log, _ = train(synthetic_cache, tmp_path, *PARITY, name="one")
    one = epochs_of(one_log)
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["hr"] == pytest.approx(a["hr"], abs=0.01)
    # Against one process that splits each batch in the same two halves, only float rounding differs.
    _, halves_log, _ = train(synthetic_cache, tmp_path, *PARITY, "--grads_accumulated", "2", "--accumulate", "split",
                          name="halves")
    for a, b in zip(epochs_of(halves_log), two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


def test_only_rank_zero_prints_logs_and_writes(two_process_run):
    result, out = two_process_run
    assert result.stdout.count("epoch 1 | loss") == 1
    assert result.stdout.count("device cpu | world size 2") == 1
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(set(lines))
    records = [r["event"] for r in epochs_of(out / "log.json")]
    assert records == ["epoch", "epoch"]
    assert event_of(out / "log.json", "config")["world_size"] == 2
    assert sorted(os.listdir(out / "ck")) == [".lock", "last.pth", "model.pth"]  # rank 0's lock: one run


def test_torch_distributed_launch_passes_local_rank(synthetic_cache, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_port", str(free_port()),
           str(ROOT / "ncf.py"), *ncf_args(synthetic_cache, tmp_path, "-e", "1", "--opt_level", "O0")]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    assert len(epochs_of(tmp_path / "log.json")) == 1


def test_two_nodes_on_one_machine_match_two_local_processes(two_process_run, synthetic_cache, tmp_path):
    port = free_port()
    nodes = []
    for node in range(2):
        launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    "--rdzv_id=ncf-test"]
        out = tmp_path / f"node{node}"
        nodes.append(subprocess.Popen(torchrun_cmd(*launcher) + ncf_args(synthetic_cache, out, *PARITY), cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    # Each "machine" has its own folders; only the one that hosts global rank 0 writes.
    writers = [node for node in range(2) if (tmp_path / f"node{node}" / "log.json").exists()]
    assert len(writers) == 1
    assert not (tmp_path / f"node{1 - writers[0]}" / "ck" / "model.pth").exists()
    _, single_node = two_process_run
    two_nodes = figures(tmp_path / f"node{writers[0]}" / "log.json")
    for a, b in zip(figures(single_node / "log.json"), two_nodes, strict=True):
        assert b == pytest.approx(a, rel=1e-6)


def test_evaluation_split_over_ranks_matches_one_process(two_process_run, synthetic_cache, tmp_path):
    _, out = two_process_run
    results = {}
    for nproc in (1, 2):
        log = tmp_path / f"test{nproc}.json"
        args = ["--data", str(synthetic_cache), "--mode", "test", "--load_checkpoint_path",
                str(out / "ck" / "model.pth"), "--opt_level", "O0", "--log_path", str(log),
                "--valid_batch_size", "10000"]
        result = run(torchrun_cmd("--standalone", f"--nproc_per_node={nproc}") + args)
        assert result.returncode == 0, result.stderr[-3000:]
        results[nproc] = event_of(log, "test")
    # 799 users: ranks score 400 and 399 of them.
    assert results[2]["hr"] == pytest.approx(results[1]["hr"], rel=1e-12)
    assert results[2]["ndcg"] == pytest.approx(results[1]["ndcg"], rel=1e-12)
    assert results[2]["mrr"] == pytest.approx(results[1]["mrr"], rel=1e-12) and results[1]["mrr"] > 0
    assert results[1]["hr"] == event_of(out / "log.json", "summary")["best_hr"]


def worker_pids(launcher_pid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == launcher_pid:
                pids.append(int(entry))
    return pids


def test_a_dead_rank_ends_the_job_promptly(synthetic_cache, tmp_path):
    cmd = torchrun_cmd("--standalone", "--nproc_per_node=2") + ncf_args(synthetic_cache, tmp_path, "-e", "200",
                                                                         "--opt_level", "O0")
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in job.stdout:  # wait until training runs
            if line.startswith("epoch 1 |"):
                break
        workers = worker_pids(job.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        job.wait(timeout=60)
        assert time.monotonic() - killed_at < 60
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()


def test_batch_not_divisible_by_world_size_is_a_clear_error(synthetic_cache, tmp_path):
    cmd = torchrun_cmd("--standalone", "--nproc_per_node=2") + ncf_args(synthetic_cache, tmp_path, "-b", "1001")
    result = run(cmd)
    assert result.returncode != 0
    assert result.stderr.count("--batch_size 1001 is not divisible by world size 2") == 1
    # torchrun adds its own report of the failed worker; ncf.py itself shows no traceback.
    assert 'ncf.py", line' not in result.stderr


# Issue 21: how a finished multi-process run ends. ncf.py run through a wrapper in which rank 0 writes its
# last.pth (after the last collective of the run) two seconds late, or fails to write it as a full disk
# makes it fail; each rank notes when it wrote its files and when it left.
WRAPPER = """\
import os, sys, time
sys.path.insert(0, {root!r})
import checkpoint, cli, ncf

MODE, NOTES, RANK = {mode!r}, {notes!r}, os.environ["RANK"]
real_save_atomic = checkpoint.save_atomic


def note(name):
    with open(os.path.join(NOTES, name), "w") as f:
        f.write(repr(time.time()))


def save_atomic(obj, path):
    if RANK == "0" and os.path.basename(path) == checkpoint.LAST_CHECKPOINT:
        time.sleep(2)
        if MODE == "fail":
            raise cli.EnvironmentFailure("cannot write " + path + " (a full disk, injected)")
    real_save_atomic(obj, path)
    note("written-" + RANK)


checkpoint.save_atomic = save_atomic
ncf.main(sys.argv[1:])
note("left-" + RANK)
"""


def wrapped_ncf(tmp_path, mode):
    notes = tmp_path / "notes"
    notes.mkdir()
    script = tmp_path / "wrapped_ncf.py"
    script.write_text(WRAPPER.format(root=str(ROOT), mode=mode, notes=str(notes)))
    return script, notes


def noted(notes, name):
    return float((notes / name).read_text())


def test_ranks_leave_together_once_rank_zero_has_written_its_files(synthetic_cache, tmp_path):
    """A rank that finished first used to leave at once, while rank 0 was still writing: it went into
    interpreter shutdown with a gloo worker thread still releasing its last collective's tensors, and
    aborted ("terminate called without an active exception", exit -6). Now every rank waits at the end
    until rank 0 has written its files and closed its log."""
    script, notes = wrapped_ncf(tmp_path, "slow")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *ncf_args(synthetic_cache, tmp_path / "out", "-e", "1", "--opt_level", "O0")]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr
    assert noted(notes, "left-1") >= noted(notes, "written-0")
    assert event_of(tmp_path / "out" / "log.json", "summary")["best_epoch"] == 1


def test_a_rank_that_fails_at_the_end_fails_every_node_promptly(synthetic_cache, tmp_path):
    """Two nodes, so that no launcher ends the other's worker: rank 0 fails writing last.pth while rank 1
    waits for it at the end of the run. Rank 1 learns it from its closed connection, and both nodes end
    with a non-zero status within seconds (not at a timeout, and never with status 0 on one node while
    the other waits minutes at torchrun's exit barrier)."""
    script, _ = wrapped_ncf(tmp_path, "fail")
    port = free_port()
    nodes = []
    start = time.monotonic()
    for node in range(2):
        launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    f"--rdzv_id=ncf-fails-{port}"]
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *launcher, str(script),
             *ncf_args(synthetic_cache, tmp_path / f"node{node}", "-e", "1", "--opt_level", "O0")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=240) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    stderr = outputs[0][1] + outputs[1][1]
    assert all(p.returncode != 0 for p in nodes), stderr[-3000:]
    assert "(a full disk, injected)" in stderr
    # Both nodes started and trained (seconds on this data); the end is no timeout away.
    assert time.monotonic() - start < 180


@pytest.mark.parametrize("stop", [["-e", "20", "-t", "0.05"], ["-e", "40", "--patience", "1"]],
                         ids=["threshold", "patience"])
def test_a_run_stopped_early_ends_with_status_0_on_every_rank(synthetic_cache, tmp_path, stop):
    """--threshold and --patience stop every rank after the same epoch (the figures they compare are
    all-reduced), and the job ends with status 0."""
    result = run(torchrun_cmd("--standalone", "--nproc_per_node=2")
                 + ncf_args(synthetic_cache, tmp_path, "--opt_level", "O0", *stop))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("reached --threshold" if "-t" in stop else "(--patience;") in result.stdout
    done = len(epochs_of(tmp_path / "log.json"))
    assert done < int(stop[1])
    assert event_of(tmp_path / "log.json", "summary")["interrupted"] is False
