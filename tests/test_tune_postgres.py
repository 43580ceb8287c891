"""A study shared by several machines on a real database (issue 25, part 2): two tune.py workers at once on
one PostgreSQL study run --trials trials in all, none twice, each sees the other's, and a worker killed with
SIGKILL leaves its trial failed (its heartbeat stops) while the other goes on.

The slow test starts its own PostgreSQL server (Debian's `postgresql` package, which .ci/run installs):
`initdb` into a temporary folder and `pg_ctl` on a free port of 127.0.0.1, as an unprivileged user when the
tests run as root (the server refuses root), and stops it whatever happens. Each worker has its own --output,
as each machine would.
"""
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import ROOT, make_tiny_cache

TINY = ["--factors", "8", "--layers", "32", "16", "8", "--opt_level", "O0", "-b", "4096"]


def test_the_driver_tune_py_names_is_the_one_requirements_tune_installs_for_postgresql_urls():
    """SQLAlchemy reads postgresql:// with one driver module; tune.py's missing-driver message names a pip
    package for it, and requirements-tune.txt must install that package."""
    from sqlalchemy.engine import make_url

    import tune

    module = make_url("postgresql://u@h/db").get_dialect().driver
    package = tune.DRIVER_PACKAGES[module].strip("'")
    requirements = (ROOT / "requirements-tune.txt").read_text().split()
    assert any(line.startswith(package) for line in requirements), (package, requirements)


def test_a_worker_that_collides_with_another_creating_optunas_tables_opens_the_storage_again(monkeypatch):
    """Workers started at once on an empty database all create Optuna's tables, and all but one fail with a
    duplicate key or "already exists" (Optuna issue 1092); tune.py opens the storage again."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    import tune

    collisions = [IntegrityError("INSERT", {}, Exception("duplicate key value violates unique constraint")),
                  ProgrammingError("CREATE TABLE", {}, Exception('relation "studies" already exists'))]
    opened = []

    def storage(url, **kwargs):
        if collisions:
            raise collisions.pop(0)
        opened.append(url)
        return "the storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", storage)
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)
    assert tune.make_storage(optuna, "postgresql://u@h/db") == "the storage" and opened == ["postgresql://u@h/db"]


# -- the server ------------------------------------------------------------------------------------------------


def postgres_bin():
    """The folder of Debian's PostgreSQL binaries (the newest), or of pg_ctl on the PATH; None if neither."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    pg_ctl = found[-1] if found else shutil.which("pg_ctl")
    return os.path.dirname(pg_ctl) if pg_ctl else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """The URL of a fresh database on a PostgreSQL server of its own, stopped (and its folder removed) at
    the end whatever happens."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        message = "PostgreSQL is not installed: apt-get install postgresql (.ci/run does)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    folder = tempfile.mkdtemp(prefix="tune-postgres-")
    as_user = []
    if os.geteuid() == 0:  # the server refuses root: run it as the package's user, or nobody
        name = "postgres" if "postgres" in {u.pw_name for u in pwd.getpwall()} else "nobody"
        os.chown(folder, pwd.getpwnam(name).pw_uid, pwd.getpwnam(name).pw_gid)
        as_user = ["runuser", "-u", name, "--"]
    data, port = os.path.join(folder, "data"), free_port()

    def run(*command):
        result = subprocess.run([*as_user, *command], capture_output=True, text=True, timeout=120, cwd=folder)
        assert result.returncode == 0, (command, result.stdout, result.stderr)

    try:
        run(f"{bin_dir}/initdb", "-D", data, "-U", "tune", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        run(f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "-t", "60", "-o",
            f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off", "start")
        run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tune", "tune")
        yield f"postgresql://tune@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*as_user, f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


# -- two workers -----------------------------------------------------------------------------------------------


@pytest.fixture
def started():
    """The worker processes a test starts: any still running at its end (a failed assertion) is killed."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def start_worker(started, cache, space, out, url, trials, seed, *extra):
    """A tune.py process, as one machine runs it; its output goes to OUT.stdout and OUT.stderr."""
    argv = [sys.executable, str(ROOT / "tune.py"), "--data", str(cache), "--trials", str(trials), "--epochs", "2",
            "--output", str(out), "--storage", url, "--study_name", "shared", "--space", str(space), "--seed",
            str(seed), "--confirm_top", "1", "--confirm_seeds", "2", "--no_plots", *extra, "--", *TINY]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        started.append(subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=ROOT))
    return started[-1]


def finish(worker, out):
    """The worker's exit status and stdout, once it ends (two minutes at most)."""
    try:
        status = worker.wait(timeout=120)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise
    return status, Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()


def ran(out, kind="trials"):
    """The numbers of the trials (or confirmation runs) this worker ran: its folders under OUTPUT/shared."""
    folder = out / "shared" / kind
    return {int(name) for name in os.listdir(folder)} if folder.is_dir() else set()


def table(printed):
    """{trial number: state} from the trial table a worker printed."""
    return {int(m[1]): m[2] for m in re.finditer(r"^\s+(\d+)\s+(done|pruned|fail|surplus|running)\s", printed, re.M)}


def load(url, name="shared"):
    import optuna

    return optuna.load_study(study_name=name, storage=url).trials


def check_confirmation_runs(url, outs):
    """Each confirmation run complete once, by one worker."""
    runs = [r for r in load(url, "shared.confirm") if r.state.name == "COMPLETE"]
    keys = [r.user_attrs["run"] for r in runs]
    assert len(keys) == len(set(keys)) > 0
    folders = [ran(out, "confirm") for out in outs]
    assert not set.intersection(*folders) and {r.number for r in runs} <= set.union(*folders)


@pytest.mark.slow
def test_two_workers_share_one_study_and_a_killed_one_leaves_its_trial_failed(postgres, tmp_path, started):
    cache = make_tiny_cache(tmp_path / "data", validation=True)
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}}))
    a, b = tmp_path / "a", tmp_path / "b"

    # Both at once, from nothing: one creates the study, and the two run 8 trials together.
    workers = [start_worker(started, cache, space, a, postgres, 8, 1, "--heartbeat", "1"),
               start_worker(started, cache, space, b, postgres, 8, 2, "--heartbeat", "1")]
    (status_a, printed_a, err_a), (status_b, printed_b, err_b) = finish(workers[0], a), finish(workers[1], b)
    assert status_a == 0 and status_b == 0, (err_a, err_b)
    trials = [t for t in load(postgres) if not t.user_attrs.get("surplus")]
    assert len(trials) == 8 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert ran(a) and ran(b) and not ran(a) & ran(b)  # both worked, on different trials
    assert ran(a) | ran(b) == {t.number for t in trials}
    assert set(table(printed_a)) == set(table(printed_b)) == {t.number for t in load(postgres)}  # each sees all
    check_confirmation_runs(postgres, (a, b))
    best_a, best_b = (json.loads((out / "shared" / "best.json").read_text()) for out in (a, b))
    assert best_a["confirmation"] == best_b["confirmation"] and best_a["command"] == best_b["command"]

    # On to 16: A is killed with SIGKILL as a trial of its starts; B goes on, fails it once its heartbeat
    # (recorded with the study: 1 s, so 3 s of grace) is old, and the study still ends with 16 trials.
    before = ran(a)
    workers = [start_worker(started, cache, space, a, postgres, 16, 1),
               start_worker(started, cache, space, b, postgres, 16, 2)]
    deadline = time.monotonic() + 90
    while not (ran(a) - before) and workers[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGKILL)
    (killed,) = ran(a) - before
    assert workers[0].wait(timeout=30) == -signal.SIGKILL
    status_b, printed_b, err_b = finish(workers[1], b)
    assert status_b == 0, err_b
    trials = {t.number: t for t in load(postgres) if not t.user_attrs.get("surplus")}
    assert len(trials) == 16 and trials[killed].state.name == "FAIL"
    assert all(t.state.name in ("COMPLETE", "PRUNED") for n, t in trials.items() if n != killed)
    assert not ran(a) & ran(b) and ran(a) | ran(b) == set(trials)
    assert table(printed_b)[killed] == "fail"
    check_confirmation_runs(postgres, (a, b))
