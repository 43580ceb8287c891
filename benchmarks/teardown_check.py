"""Exit statuses of multi-process runs at their end (issue 21): each way ncf.py runs several processes,
run N times on tiny data, with the machine loaded, and the launchers' exit statuses counted.

    python benchmarks/teardown_check.py                    # all ways, CPU burners beside them
    python benchmarks/teardown_check.py --load pytest      # the fast test tier running beside them instead
    python benchmarks/teardown_check.py --adversarial      # the scheduling that exposes the teardown race
    python benchmarks/teardown_check.py --root /other/checkout --ways torchrun launch --runs 10

Ways (gloo on CPU, 2 ranks, 1 epoch unless said):
  torchrun      torchrun --standalone --nproc_per_node=2                                  (--runs, 20)
  launch        python -m torch.distributed.launch --nproc_per_node=2                     (--runs, 20)
  two_nodes     two torchrun --nnodes=2 --nproc_per_node=1, c10d rendezvous on 127.0.0.1  (--runs, 20)
  test_mode     --mode test of a checkpoint on two ranks                                  (--early, 5)
  threshold     -e 20 -t 0.05: stopped by --threshold after epoch 1                       (--early, 5)
  patience      -e 40 --patience 1: stopped by --patience                                 (--early, 5)
  sigterm       -e 100, SIGTERM to rank 1 after epoch 1: stops after the epoch, every rank  (--early, 5)
                exits 130 (a stopped run), torchrun 1 with its summary of those codes
  rank_fails    rank 0 fails writing last.pth (a full disk, injected) while rank 1 waits  (--early, 5)
                for it at the end: the job must fail, promptly (under --prompt_s)
  rank_fails_two_nodes   the same across two "machines", where no launcher kills the peer (--early, 5)

Expected: every launcher exits 0 in every run of the first six ways, and sigterm's with every rank's
130, with no aborted rank; the two
rank_fails ways exit non-zero within --prompt_s. A run that passes --timeout_s is killed and counted
as a timeout.

Load: --load burn (default) runs one busy-looping process per CPU beside the runs; --load pytest runs
`pytest -m "not slow"` of --root over and over; --load none nothing. --adversarial pins every run and two
burners to CPU 0 and renices the gloo worker threads (pt_gloo_runloop) of every rank to 19, so that
such a thread can be kept off the CPU for a while after it finished a collective, as a loaded machine
sometimes does: before the fix of issue 21 about a third of 2-process runs then aborted at the end.

Prints one JSON line per way (launcher exit statuses, aborted runs, timeouts, times) and a table; exit
status 1 when any run ended otherwise than expected.
"""
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from cli import NEW_FILES_ONLY, ArgumentParser, main_guard, open_owned_for_append, owned_file  # noqa: E402

# Each run writes into a folder of its own that it has just made: a file already there is not replaced.
LAUNCH_WAYS = ("torchrun", "launch", "two_nodes")
EXPECTED = {"sigterm": "1, each rank 130", "rank_fails": "non-zero, prompt", "rank_fails_two_nodes": "non-zero, prompt"}
EARLY_WAYS = ("test_mode", "threshold", "patience", "sigterm", "rank_fails", "rank_fails_two_nodes")
FAILING_WAYS = ("rank_fails", "rank_fails_two_nodes")
TINY_TRAIN = ["-f", "16", "--layers", "64", "32", "16", "-b", "2048", "-l", "0.01", "--no_progress",
              "--opt_level", "O0"]
# Rank 0 fails as a full disk makes it fail, after the last epoch's collectives, so that rank 1 is
# already waiting for it at the end of the run.
FAILING_WRAPPER = """\
import os, sys, time
sys.path.insert(0, {root!r})
import checkpoint, cli, ncf
real = checkpoint.save_atomic
def save_atomic(obj, path):
    if os.environ.get("RANK") == "0" and os.path.basename(path) == checkpoint.LAST_CHECKPOINT:
        time.sleep(1)  # rank 1 is at the end of its run by now
        raise cli.EnvironmentFailure("cannot write " + path + " (injected by teardown_check.py)")
    return real(obj, path)
checkpoint.save_atomic = save_atomic
ncf.main(sys.argv[1:])
"""


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=HERE, help="the checkout whose ncf.py runs (default: this one)")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--ways", nargs="+", choices=LAUNCH_WAYS + EARLY_WAYS, default=list(LAUNCH_WAYS + EARLY_WAYS))
    p.add_argument("--runs", type=int, default=20, help="runs of each launch way")
    p.add_argument("--early", type=int, default=5, help="runs of each other way")
    p.add_argument("--load", choices=("burn", "pytest", "none"), default="burn")
    p.add_argument("--adversarial", action="store_true")
    p.add_argument("--data", help="a cache folder (default: a tiny synthetic one, 799 users, built here)")
    p.add_argument("--workdir", help="keep each run's output here (default: a temporary folder)")
    p.add_argument("--timeout_s", type=float, default=300)
    p.add_argument("--prompt_s", type=float, default=60)
    return p.parse_args(argv)


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_cache(args, folder):
    csv, cache = os.path.join(folder, "ratings.csv"), os.path.join(folder, "cache")
    for cmd in ([args.python, os.path.join(args.root, "synthetic.py"), "--output", csv, "--users", "799",
                 "--items", "400", "--interactions_per_user_mean", "30", "--seed", "0"],
                [args.python, os.path.join(args.root, "convert.py"), "--path", csv, "--output", cache,
                 "--negatives", "100", "--no_progress"]):
        subprocess.run(cmd, check=True, env=child_env(), capture_output=True, encoding="utf-8")
    return cache


# -- load --------------------------------------------------------------------------------------------


class Load:
    """Busy loops (or the fast test tier) running beside the runs, for as long as the block lasts."""

    def __init__(self, kind, root, python, adversarial):
        self.kind, self.root, self.python, self.adversarial = kind, root, python, adversarial
        self.procs, self.stop = [], threading.Event()

    def burner(self, cpus=None):
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.procs.append(subprocess.Popen([self.python, "-c", "while True: pass"], preexec_fn=pin))

    def pytest_loop(self):
        while not self.stop.is_set():
            proc = subprocess.Popen([self.python, "-m", "pytest", "-q", "-m", "not slow"],
                                    cwd=self.root, env=child_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            while proc.poll() is None and not self.stop.is_set():
                time.sleep(0.5)

    def __enter__(self):
        if self.adversarial:
            for _ in range(2):
                self.burner({0})
        if self.kind == "burn":
            for _ in range(os.cpu_count() or 1):
                self.burner()
        elif self.kind == "pytest":
            threading.Thread(target=self.pytest_loop, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# -- processes ---------------------------------------------------------------------------------------


def children_of():
    """{parent pid: [child pids]} from /proc."""
    tree = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree[ppid].append(int(entry))
    return tree


def descendants(pids):
    tree, found, todo = children_of(), [], list(pids)
    while todo:
        pid = todo.pop()
        for child in tree.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(line.split(b"=", 1) for line in f.read().split(b"\0") if b"=" in line)
        return int(env[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


class Renicer(threading.Thread):
    """While the launchers run: nice 19 for every pt_gloo_runloop thread of their workers."""

    def __init__(self, launchers):
        super().__init__(daemon=True)
        self.launchers, self.done, self.stop = launchers, set(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            for pid in descendants(p.pid for p in self.launchers):
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    if (pid, tid) in self.done:
                        continue
                    try:
                        with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as f:
                            if f.read().strip() != "pt_gloo_runloop":
                                continue
                        os.setpriority(os.PRIO_PROCESS, int(tid), 19)
                        self.done.add((pid, tid))
                    except OSError:
                        continue
            time.sleep(0.02)


def torchrun(python, *launcher_args):
    return [python, "-m", "torch.distributed.run", *launcher_args]


def commands(way, args, out, data, model_path):
    """[(launcher command, its own output folder)] for one run of `way`."""
    ncf = os.path.join(args.root, "ncf.py")

    def train(folder, *extra):
        os.makedirs(folder, exist_ok=True)
        return ["--data", data, "--checkpoint_dir", os.path.join(folder, "ck"), "--log_path",
                os.path.join(folder, "log.json"), *TINY_TRAIN, *extra]

    standalone = torchrun(args.python, "--standalone", "--nproc_per_node=2")
    if way == "torchrun":
        return [([*standalone, ncf, *train(out, "-e", "1")], out)]
    if way == "launch":
        return [([args.python, "-m", "torch.distributed.launch", "--nproc_per_node=2", "--master_port",
                  str(free_port()), ncf, *train(out, "-e", "1")], out)]
    if "two_nodes" in way:
        port, script = free_port(), ncf if way == "two_nodes" else os.path.join(out, "failing.py")
        runs = []
        for node in range(2):
            folder = os.path.join(out, f"node{node}")
            launcher = torchrun(args.python, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=teardown-{port}")
            runs.append(([*launcher, script, *train(folder, "-e", "1")], folder))
        return runs
    if way == "test_mode":
        os.makedirs(out, exist_ok=True)
        return [([*standalone, ncf, "--data", data, "--mode", "test", "--load_checkpoint_path", model_path,
                  "--log_path", os.path.join(out, "log.json"), "--opt_level", "O0"], out)]
    if way == "threshold":
        return [([*standalone, ncf, *train(out, "-e", "20", "-t", "0.05")], out)]
    if way == "patience":
        return [([*standalone, ncf, *train(out, "-e", "40", "--patience", "1")], out)]
    if way == "sigterm":
        return [([*standalone, ncf, *train(out, "-e", "100")], out)]
    if way == "rank_fails":
        return [([*standalone, os.path.join(out, "failing.py"), *train(out, "-e", "1")], out)]
    raise ValueError(way)


def wait_for_line(path, text, proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with open(path, encoding="utf-8") as f:
                if any(line.startswith(text) for line in f):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def sigterm_rank_1(out, launcher, timeout_s):
    """SIGTERM to rank 1 once rank 0 printed its epoch 1; a note of what went otherwise ('' if nothing)."""
    if not wait_for_line(os.path.join(out, "stdout"), "epoch 1 |", launcher, timeout_s):
        return "no epoch 1 line"
    workers = {rank_of(pid): pid for pid in descendants([launcher.pid])}
    if 1 not in workers:
        return "rank 1 not found"
    os.kill(workers[1], signal.SIGTERM)
    return ""


def one_run(way, args, out, data, model_path):
    """One run of `way`: its launchers' exit statuses, whether a rank aborted, and its wall time."""
    os.makedirs(out, exist_ok=True)
    if way in FAILING_WAYS:
        with owned_file(os.path.join(out, "failing.py"), "--workdir", NEW_FILES_ONLY, "a wrapper") as f:
            f.write(FAILING_WRAPPER.format(root=args.root).encode())
    pin = (lambda: os.sched_setaffinity(0, {0})) if args.adversarial else None
    launchers, files = [], []
    start = time.monotonic()
    for cmd, folder in commands(way, args, out, data, model_path):
        stdout, stderr = (open_owned_for_append(os.path.join(folder, name), "--workdir", NEW_FILES_ONLY, "a log")
                          for name in ("stdout", "stderr"))
        files += [stdout, stderr]
        launchers.append(subprocess.Popen(cmd, cwd=folder, env=child_env(), stdout=stdout, stderr=stderr,
                                          preexec_fn=pin))
    renicer = Renicer(launchers) if args.adversarial else None
    if renicer:
        renicer.start()
    note = ""
    try:
        if way == "sigterm":
            note = sigterm_rank_1(out, launchers[0], args.timeout_s)
        statuses, timed_out = [], False
        for proc in launchers:
            remaining = max(1.0, args.timeout_s - (time.monotonic() - start))
            try:
                statuses.append(proc.wait(timeout=remaining))
            except subprocess.TimeoutExpired:
                timed_out = True
                for p in [*descendants([proc.pid]), proc.pid]:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                statuses.append(proc.wait())
    finally:
        if renicer:
            renicer.stop.set()
        for f in files:
            f.close()
    elapsed = time.monotonic() - start
    stdout, stderr = (read_outputs(out, way, name) for name in ("stdout", "stderr"))
    aborted = "terminate called" in stderr or "SIGABRT" in stderr
    if way in FAILING_WAYS:
        ok = all(s != 0 for s in statuses) and not timed_out and elapsed < args.prompt_s
    else:
        ok = not aborted and not timed_out
        if way == "sigterm":  # torchrun's 1, for its ranks' 130 (and none other)
            codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr))
            ok = ok and statuses == [1] and codes == {"130"} and "stopped by SIGTERM after epoch" in stdout
        else:
            ok = ok and all(s == 0 for s in statuses)
        if way == "threshold":
            ok = ok and "reached --threshold" in stdout
        if way == "patience":
            ok = ok and "(--patience;" in stdout
    return {"statuses": statuses, "aborted": aborted, "timed_out": timed_out, "seconds": elapsed, "ok": ok,
            "note": note}


def read_outputs(out, way, name):
    """The launchers' stdout or stderr of one run, together."""
    folders = [os.path.join(out, "node0"), os.path.join(out, "node1")] if "two_nodes" in way else [out]
    text = ""
    for folder in folders:
        try:
            with open(os.path.join(folder, name), errors="replace", encoding="utf-8") as f:
                text += f.read()
        except OSError:
            pass
    return text


@main_guard
def main(argv=None):
    args = parse_args(argv)
    args.root = os.path.abspath(args.root)
    workdir = args.workdir or tempfile.mkdtemp(prefix="teardown_check-")
    os.makedirs(workdir, exist_ok=True)
    data = args.data or build_cache(args, workdir)
    model_path = None
    if "test_mode" in args.ways:  # one checkpoint to evaluate, trained by one process
        folder = os.path.join(workdir, "checkpoint_for_test_mode")
        subprocess.run([args.python, os.path.join(args.root, "ncf.py"), "--data", data, "--checkpoint_dir",
                        os.path.join(folder, "ck"), *TINY_TRAIN, "-e", "1"], check=True, env=child_env(),
                       capture_output=True)
        model_path = os.path.join(folder, "ck", "model.pth")
    settings = {"root": args.root, "load": args.load, "adversarial": args.adversarial, "cpus": os.cpu_count()}
    print(json.dumps({"settings": settings, "workdir": workdir}), flush=True)
    rows, all_ok = [], True
    with Load(args.load, args.root, args.python, args.adversarial):
        for way in args.ways:
            n = args.runs if way in LAUNCH_WAYS else args.early
            results = [one_run(way, args, os.path.join(workdir, way, str(i)), data, model_path) for i in range(n)]
            statuses = collections.Counter(",".join(map(str, r["statuses"])) for r in results)
            seconds = [r["seconds"] for r in results]
            record = {"way": way, "runs": n, "expected": EXPECTED.get(way, "0"),
                      "as_expected": sum(r["ok"] for r in results), "launcher_exit_statuses": dict(statuses),
                      "aborted_runs": sum(r["aborted"] for r in results),
                      "timeouts": sum(r["timed_out"] for r in results),
                      "median_s": round(statistics.median(seconds), 1),
                      "max_s": round(max(seconds), 1), "notes": [r["note"] for r in results if r["note"]],
                      **settings}
            print(json.dumps(record), flush=True)
            rows.append(record)
            all_ok &= record["as_expected"] == n
    print(f"\n{'way':<22} {'runs':>4} {'as expected':>11} {'aborted':>7} {'timeouts':>8} {'median s':>8} "
          f"{'max s':>6}  launcher exit statuses")
    for r in rows:
        print(f"{r['way']:<22} {r['runs']:>4} {r['as_expected']:>11} {r['aborted_runs']:>7} {r['timeouts']:>8} "
              f"{r['median_s']:>8} {r['max_s']:>6}  {r['launcher_exit_statuses']}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
