"""Never delete or replace what the project did not provably write; every output path is checked
before the work; a full disk or Ctrl-C leaves no partial output.

The fast tests call each script's main(argv) in-process and catch its SystemExit; the slow ones run
the real command lines (a real SIGINT, a real write failure)."""
import ast
import errno
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, make_tiny_cache

import allocator
import cli
import convert
import synthetic
from logger import plot

sys.path.insert(0, str(ROOT / "benchmarks"))
import stability

RATINGS = "userId,movieId,rating,timestamp\n" + "".join(
    f"{u},{i},4.0,{u * 100 + i}\n" for u in range(1, 6) for i in range(u, u + 8))  # 5 users, 8 of 12 items


def fails(capsys, main, argv, status=2):
    """Run main(argv) in-process; assert exit `status` and one stderr line without a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        try:
            main([str(a) for a in argv])
        except KeyboardInterrupt:  # would end the whole pytest session
            pytest.fail("Ctrl-C escaped as a KeyboardInterrupt instead of one line and exit 130")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == status, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def snapshot(folder):
    """Every file under `folder` with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ratings(tmp_path):
    path = tmp_path / "in" / "ratings.csv"
    path.parent.mkdir()
    path.write_text(RATINGS)
    return path


def convert_argv(path, output, *extra):
    return ["--path", path, "--output", output, "--min_ratings", 2, "--negatives", 2, "--no_progress", *extra]


@pytest.fixture
def own_cache(ratings, tmp_path):
    output = tmp_path / "cache"
    convert.main([str(a) for a in convert_argv(ratings, output)])
    return output


# ---- convert.py --output ------------------------------------------------------------------------

def test_convert_replaces_its_own_cache(ratings, own_cache, capsys):
    before = (own_cache / "test_negatives.pt").read_bytes()
    convert.main([str(a) for a in convert_argv(ratings, own_cache, "--seed", 5)])
    assert (own_cache / "test_negatives.pt").read_bytes() != before
    assert sorted(os.listdir(own_cache.parent)) == ["cache", "in"]


def test_convert_refuses_a_cache_with_one_more_file(ratings, own_cache, capsys):
    (own_cache / "notes.txt").write_text("mine")
    before = snapshot(own_cache)
    line = fails(capsys, convert.main, convert_argv(ratings, own_cache))
    assert "--output" in line and "not a convert cache" in line
    assert snapshot(own_cache) == before


def test_convert_refuses_a_cache_lookalike_it_did_not_write(ratings, own_cache, capsys):
    metadata = json.loads((own_cache / "metadata.json").read_text())
    metadata["created_by"] = "someone else"
    (own_cache / "metadata.json").write_text(json.dumps(metadata))
    before = snapshot(own_cache)
    assert "not a convert cache" in fails(capsys, convert.main, convert_argv(ratings, own_cache))
    assert snapshot(own_cache) == before


def test_convert_fills_an_empty_folder(ratings, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    convert.main([str(a) for a in convert_argv(ratings, tmp_path / "empty")])
    assert convert.cache_is_complete(tmp_path / "empty")


@pytest.mark.parametrize("where", ["the input's folder", "a folder above it"])
def test_convert_never_replaces_the_folder_of_its_input(ratings, tmp_path, capsys, monkeypatch, where):
    output = ratings.parent if where == "the input's folder" else tmp_path
    # Even a folder the replace rule would accept: the input is never at stake.
    monkeypatch.setattr(convert, "is_replaceable", lambda folder: True)
    before = snapshot(tmp_path)
    line = fails(capsys, convert.main, convert_argv(ratings, output))
    assert "holds the input --path" in line
    assert snapshot(tmp_path) == before


def never_read(*args):
    raise AssertionError("the input was read before the output was checked")


@pytest.mark.parametrize("case, words", [
    ("a file", ["is a file, not a folder"]),
    ("under a file", ["cannot be created", "is a file"]),
    ("/dev/full", ["is a device", "not a folder"]),
    ("read-only parent", ["not writable"]),
])
def test_convert_checks_the_output_path_before_any_work(ratings, tmp_path, capsys, monkeypatch, case, words):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    output = {"a file": blocker, "under a file": blocker / "sub" / "cache", "/dev/full": "/dev/full",
              "read-only parent": tmp_path / "ro" / "cache"}[case]
    if case == "read-only parent":
        (tmp_path / "ro").mkdir()
        # Tests may run as root, whom permissions do not stop: ask the question os.access answers.
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and not str(p).endswith("/ro"))
    monkeypatch.setattr(convert, "read_ratings", never_read)
    line = fails(capsys, convert.main, convert_argv(ratings, output))
    for word in words:
        assert word in line, (word, line)
    assert blocker.read_text() == "mine"
    assert not (tmp_path / "ro" / "cache").exists()


def test_check_output_alone_runs_the_same_checks(ratings, own_cache, capsys):
    convert.main(["--check_output", str(own_cache), "--path", str(ratings)])  # ours: fine
    convert.main(["--check_output", str(own_cache.parent / "new")])
    (own_cache / "notes.txt").write_text("mine")
    assert "not a convert cache" in fails(capsys, convert.main, ["--check_output", own_cache])
    assert "holds the input" in fails(capsys, convert.main, ["--check_output", ratings.parent, "--path", ratings])


# ---- convert.py: a full disk, Ctrl-C ------------------------------------------------------------

def full_disk_after(count, masked):
    """A torch.save that writes some bytes and then meets a full disk, from its `count`-th call;
    `masked` as torch's zip writer does it, behind a RuntimeError of its own."""
    import torch

    calls = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < count:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            if masked:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
            raise

    return save


@pytest.mark.parametrize("masked", [False, True])
def test_convert_on_a_full_disk_is_one_line_exit_1_and_keeps_the_old_cache(ratings, own_cache, capsys,
                                                                            monkeypatch, masked):
    import torch

    before = snapshot(own_cache)
    monkeypatch.setattr(torch, "save", full_disk_after(3, masked))
    line = fails(capsys, convert.main, convert_argv(ratings, own_cache, "--seed", 9), status=1)
    assert "No space left on device" in line and "nothing was left" in line
    assert snapshot(own_cache) == before
    assert sorted(os.listdir(own_cache.parent)) == ["cache", "in"]


def test_convert_interrupted_is_one_line_exit_130_and_leaves_nothing(ratings, tmp_path, capsys, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "sample_negatives", interrupt)
    line = fails(capsys, convert.main, convert_argv(ratings, tmp_path / "cache"), status=130)
    assert line.endswith(": interrupted")
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize("moment", ["while writing files", "between the two renames"])
def test_convert_interrupted_while_replacing_keeps_the_old_cache(ratings, own_cache, capsys, monkeypatch, moment):
    before = snapshot(own_cache)
    if moment == "while writing files":
        real = convert.file_record
        calls = []

        def record(path):
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(path)

        monkeypatch.setattr(convert, "file_record", record)
    else:
        real_rename = os.rename

        def rename(src, dst):
            if ".tmp-" in str(src):  # the new cache's move into place, after the old one moved aside
                raise KeyboardInterrupt
            return real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    fails(capsys, convert.main, convert_argv(ratings, own_cache, "--seed", 3), status=130)
    assert snapshot(own_cache) == before
    assert sorted(os.listdir(own_cache.parent)) == ["cache", "in"]


# ---- synthetic.py --output ----------------------------------------------------------------------

SMALL = ["--users", 30, "--items", 80, "--interactions_per_user_mean", 20]


def test_synthetic_never_replaces_an_existing_file(tmp_path, capsys):
    out = tmp_path / "ratings.csv"
    out.write_text(RATINGS)  # a real MovieLens file has the very header synthetic.py writes
    line = fails(capsys, synthetic.main, ["--output", out, *SMALL])
    assert "already exists" in line and "never replaces" in line
    assert out.read_text() == RATINGS


@pytest.mark.parametrize("case, words", [
    ("a folder", ["is a folder"]),
    ("under a file", ["cannot be created", "is a file"]),
    ("/dev/full", ["not a regular file"]),
    ("bad seed", ["--seed -1"]),
])
def test_synthetic_checks_its_output_before_generating(tmp_path, capsys, monkeypatch, case, words):
    (tmp_path / "blocker").write_text("mine")
    out = {"a folder": tmp_path, "under a file": tmp_path / "blocker" / "ratings.csv", "/dev/full": "/dev/full",
           "bad seed": tmp_path / "new.csv"}[case]
    monkeypatch.setattr(synthetic, "rating_chunks", never_read)
    line = fails(capsys, synthetic.main, ["--output", out, *SMALL, *(["--seed", -1] if case == "bad seed" else [])])
    for word in words:
        assert word in line, (word, line)
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


def test_synthetic_creates_missing_folders(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "ratings.csv"
    synthetic.main(["--output", str(out), *map(str, SMALL)])
    assert out.read_text().startswith("userId,movieId,rating,timestamp\n")


def test_synthetic_on_a_full_disk_is_one_line_exit_1_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    line = fails(capsys, synthetic.main, ["--output", tmp_path / "ratings.csv", *SMALL], status=1)
    assert "No space left on device" in line
    assert os.listdir(tmp_path) == []


def test_synthetic_interrupted_leaves_nothing(tmp_path, capsys, monkeypatch):
    def interrupt(block):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "csv_bytes", interrupt)
    line = fails(capsys, synthetic.main, ["--output", tmp_path / "ratings.csv", *SMALL], status=130)
    assert line.endswith(": interrupted")
    assert os.listdir(tmp_path) == []


# ---- benchmarks/stability.py --output -----------------------------------------------------------

def stability_args(data, output):
    return stability.parse_args(["--data", str(data), "--output", str(output), "--", "-e", "1"])


def test_stability_refuses_a_folder_it_did_not_write(tmp_path):
    data = make_tiny_cache(tmp_path / "data")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "seed_1.json").write_text("someone's log")  # our name, but no report of ours
    with pytest.raises(cli.UserError, match="did not write"):
        stability.validate(stability_args(data, tmp_path / "runs"))
    (tmp_path / "runs" / "seed_1.json").write_text('{"event": "config"}\n')  # an ncf.py log, as a run leaves it
    (tmp_path / "runs" / "stability.json").write_text(json.dumps({"created_by": stability.CREATED_BY}))
    stability.validate(stability_args(data, tmp_path / "runs"))  # now provably ours
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    with pytest.raises(cli.UserError, match="did not write"):
        stability.validate(stability_args(data, tmp_path / "runs"))


def test_stability_never_writes_into_the_data_folder(tmp_path):
    data = tmp_path / "data" / "cache"
    data.mkdir(parents=True)
    with pytest.raises(cli.UserError, match="holds the --data folder"):
        stability.validate(stability_args(data, tmp_path / "data"))
    with pytest.raises(cli.UserError, match="is a device"):
        stability.validate(stability_args(data, "/dev/full"))


# ---- logger.plot -o ------------------------------------------------------------------------------

def write_log(path, lines=None):
    lines = lines if lines is not None else [
        {"event": "config", "args": {"topk": 10}, "precision": "fp32"},
        {"event": "epoch", "epoch": 1, "loss": 0.5, "hr": 0.4, "ndcg": 0.2},
        {"event": "epoch", "epoch": 2, "loss": 0.4, "hr": 0.5, "ndcg": 0.3},
    ]
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def printed_path(capsys):
    out = capsys.readouterr().out.strip()
    assert out.startswith("wrote ")
    return out[len("wrote "):].split(": ")[0]


@pytest.mark.parametrize("given, written", [
    ("plots", "plots/run.png"),  # an existing folder
    ("new/", "new/run.png"),
    ("curve", "curve.png"),  # matplotlib adds the suffix; now it is said
    ("curve.svg", "curve.svg"),
])
def test_plot_prints_the_file_it_writes(tmp_path, capsys, monkeypatch, given, written):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plots").mkdir()
    write_log(tmp_path / "run.json")
    plot.main(["run.json", "-o", given])
    assert printed_path(capsys) == written
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} == {"run.json", written}


@pytest.mark.parametrize("case, words", [
    ("a log", ["not .json"]),  # -o naming one of the logs: a .json is no image format
    ("a log named .png", ["is one of the logs"]),
    ("not an image", ["exists and is not a png image"]),
    ("/dev/full", ["not a regular file"]),
    ("missing parent under a file", ["cannot be created"]),
])
def test_plot_refuses_an_output_it_must_not_replace(tmp_path, capsys, case, words):
    log = write_log(tmp_path / ("log.png" if case == "a log named .png" else "run.json"))
    (tmp_path / "notes.png").write_text("not a picture")
    output = {"not an image": tmp_path / "notes.png", "/dev/full": "/dev/full",
              "missing parent under a file": log / "x.png"}.get(case, log)
    before = snapshot(tmp_path)
    line = fails(capsys, plot.main, [log, "-o", output])
    for word in words:
        assert word in line, (word, line)
    assert snapshot(tmp_path) == before


def test_plot_replaces_a_picture_of_the_same_format(tmp_path, capsys):
    log = write_log(tmp_path / "run.json")
    plot.main([str(log), "-o", str(tmp_path / "run.png")])  # an older plot of ours (its PNG carries the proof)
    older = (tmp_path / "run.png").read_bytes()
    capsys.readouterr()
    plot.main([str(log), "-o", str(tmp_path / "run.png"), "--title", "again"])
    assert printed_path(capsys) == str(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes() != older and len(older) > 10_000
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.png"]
    (tmp_path / "run.png").write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")  # a header is no proof
    with pytest.raises(SystemExit):
        plot.main([str(log), "-o", str(tmp_path / "run.png")])
    assert (tmp_path / "run.png").read_bytes().endswith(b"a picture of the user's")


EPOCH = {"event": "epoch", "epoch": 1, "loss": 0.5, "hr": 0.4, "ndcg": 0.2}


@pytest.mark.parametrize("case, bad_line, words", [
    ("truncated line", '{"event": "epoch", "epoch": 2, "lo', ["is not JSON"]),
    ("not an object", "[1, 2]", ["JSON array, not an object"]),
    ("a number", "3", ["JSON number, not an object"]),
    ("no event", {"epoch": 2}, ['"event"']),
    ("string figure", {**EPOCH, "epoch": 2, "hr": "0.5"}, ['"hr"', "not a number"]),
    ("float epoch", {**EPOCH, "epoch": 2.5}, ['"epoch"', "not an integer"]),
    ("bool loss", {**EPOCH, "epoch": 2, "loss": True}, ['"loss"', "not a number"]),
    ("epoch record without epoch", {"event": "epoch", "hr": 0.4}, ['without "epoch"']),
    ("args not an object", {"event": "config", "args": [10]}, ['"args"']),
    ("topk a string", {"event": "config", "args": {"topk": "10"}}, ['"topk"']),
])
def test_plot_malformed_logs_are_one_line(tmp_path, capsys, case, bad_line, words):
    log = write_log(tmp_path / "run.json", [{"event": "config", "args": {"topk": 10}}, EPOCH, bad_line])
    line = fails(capsys, plot.main, [log, "-o", tmp_path / "out.png"])
    for word in [f"{log} line 3", *words]:
        assert word in line, (word, line)
    assert not (tmp_path / "out.png").exists()


def test_plot_a_log_that_is_not_text_is_one_line(tmp_path, capsys):
    log = tmp_path / "run.json"
    log.write_bytes(b"\xff\xfe\n")
    line = fails(capsys, plot.main, [log, "-o", tmp_path / "out.png"])
    assert str(log) in line and "not UTF-8" in line
    assert not (tmp_path / "out.png").exists()


# ---- cli.main_guard ------------------------------------------------------------------------------

@pytest.mark.parametrize("raised, status, text", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (cli.EnvironmentFailure("disk full: free space"), 1, "error: disk full: free space"),
    (cli.UserError("bad flag: fix it"), 2, "error: bad flag: fix it"),
])
def test_main_guard_one_line_and_exit_status(capsys, raised, status, text):
    @cli.main_guard
    def main(argv):
        raise raised

    line = fails(capsys, main, [], status=status)
    assert line.endswith(f": {text}")


HELD_IN_A_COMMAND = """
import signal, sys
sys.path.insert(0, {root!r})
import cli
signal.pthread_sigmask(signal.SIG_BLOCK, cli.HELD_AT_START)  # as a command's start-up holds them
signal.raise_signal(signal.{name})  # comes during the start-up: pending, not lost

@cli.main_guard
def main():
    print("main ran", flush=True)

main()
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_that_came_during_start_up_is_reported_once_main_is_guarded(name):
    """What held Ctrl-C or SIGTERM during a command's start-up is raised when main_guard starts: one line,
    status 130, the command's main never run. (A subprocess: a SIGTERM not handled would end pytest.)"""
    code = HELD_IN_A_COMMAND.format(root=str(ROOT), name=name)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (result.returncode, result.stdout, result.stderr) == (130, "", "-c: interrupted\n")


def test_a_program_that_imports_the_modules_keeps_its_signals():
    """Only a project command started as such holds Ctrl-C during its start-up: pytest imported cli, and its
    Ctrl-C still works at once."""
    assert not set(cli.HELD_AT_START) & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_every_command_runs_its_main_guarded():
    """main_guard lets the signals held during start-up through: a command whose main were not guarded would
    hold Ctrl-C and SIGTERM for its whole run."""
    for command in allocator.COMMANDS:
        tree = ast.parse((ROOT / command).read_text(encoding="utf-8"))
        guarded = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                   and any(getattr(d, "id", None) == "main_guard" for d in node.decorator_list)}
        block = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
        called = {node.func.id for node in ast.walk(block) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name)}
        assert called & guarded, command


GUARDED_WRITER = """
import sys
sys.path.insert(0, {root!r})
import cli

@cli.main_guard
def main():
    {body}

main()
"""


def run_guarded(body, read_one_line):
    code = GUARDED_WRITER.format(root=str(ROOT), body=body)
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if read_one_line:
        job.stdout.readline()
        job.stdout.close()  # as `| head -1` does
    job.wait(timeout=60)
    return job.returncode, job.stderr.read()


def test_a_closed_output_stops_the_command_with_one_line_and_status_141():
    """`ncf.py ... | head -1`: the reader has gone, so the command stops as `yes | head` does (status 141,
    128 + SIGPIPE), with one line on stderr, not a BrokenPipeError traceback (Python's last flush included)."""
    status, err = run_guarded("while True: print('a line of output', flush=True)", read_one_line=True)
    assert (status, err) == (141, "-c: stopped: its output was closed (the command reading it ended)\n")


def test_a_broken_pipe_that_is_not_the_output_is_not_called_a_closed_output():
    status, err = run_guarded("raise BrokenPipeError(32, 'a pipe of its own')", read_one_line=False)
    assert status == 1 and "Traceback" in err and "output was closed" not in err


GUARDED_PROCESS = """
import atexit, os, signal, sys, time, weakref
sys.path.insert(0, {root!r})
import allocator, cli
allocator.started_command = lambda: {started}  # what a project command started from its command line is
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even under a background job

def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(100_000):  # Python runs the handler here, inside the caller
        pass

{prelude}

@cli.main_guard
def main():
    {body}
    print("went on")

main()
"""


def run_process(body, prelude="", started=False):
    """(status, stdout, stderr) of main_guard(main) with main's `body` in a fresh interpreter."""
    code = GUARDED_PROCESS.format(root=str(ROOT), body=body, prelude=prelude, started=started)
    job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    return job.returncode, job.stdout, job.stderr


def test_a_ctrl_c_that_a_finaliser_swallowed_still_ends_the_command_as_interrupted():
    """Python only prints a KeyboardInterrupt raised inside a finaliser ("Exception ignored in") and goes on:
    tune.py ran a whole search after one, ending 0. main_guard still reports it, status 130, in one line."""
    status, out, err = run_process("thing = type('Thing', (), {})(); weakref.finalize(thing, ctrl_c); del thing")
    assert (status, err, out) == (130, "-c: interrupted\n", "went on\n")  # no "Exception ignored" traceback


@pytest.mark.parametrize("error", ['RuntimeError("unexpected pos 704 vs 598")', 'cli.EnvironmentFailure("disk full")'])
def test_a_ctrl_c_turned_into_another_error_is_reported_as_interrupted(error):
    """torch.save's zip writer turns a Ctrl-C into a RuntimeError: ncf.py reported it as a full disk (status 1),
    convert.py as a traceback. The Ctrl-C is remembered, so it wins: one line, status 130."""
    body = f"exec('try:\\n    ctrl_c()\\nexcept KeyboardInterrupt:\\n    raise {error}')"
    status, _, err = run_process(body)
    assert (status, err) == (130, "-c: interrupted\n")


def test_a_training_step_after_a_swallowed_ctrl_c_stops_the_run(tiny_cache, tmp_path, monkeypatch):
    import ncf

    monkeypatch.setitem(cli._interrupts, "seen", True)  # as _interrupt leaves it, its exception swallowed
    with pytest.raises(SystemExit) as stop:
        ncf.main(["--data", str(tiny_cache), "-e", "1", "--checkpoint_dir", str(tmp_path / "ck"), "--no_progress"])
    assert stop.value.code == 130 and not (tmp_path / "ck").exists()
    assert cli._interrupts == {"seen": False, "depth": 0}  # the next command starts afresh


@pytest.mark.parametrize("when", ["after the work", "while reporting an error"])
def test_ctrl_c_once_the_work_is_over_changes_nothing(when):
    """A late Ctrl-C (a second press; one during the interpreter's exit) printed a traceback from an atexit
    callback or the threads' shutdown, or ended a finished run as killed: a project command ignores it."""
    body = "pass" if when == "after the work" else "raise cli.UserError('bad flag')"
    status, _, err = run_process(body, prelude="atexit.register(ctrl_c)", started=True)
    expected = (0, "") if when == "after the work" else (2, "-c: error: bad flag\n")
    assert (status, err) == expected


def test_a_sigterm_the_parent_ignores_stays_ignored_while_training():
    import ncf

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with ncf.StopRequest():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["stderr closed", "stdout closed", "stdout on a full device",
                                  "a terminal that cannot spell the path"])
def test_convert_with_odd_standard_streams(tmp_path, case):
    """`2>&-`: the work done, status 0 (it was status 1 with no word, the first file opened taking descriptor 2);
    `>&-` and `> /dev/full`: one line, status 1, no traceback; PYTHONIOENCODING=ascii and a path named données: printed
    escaped, status 0 (its last line was a UnicodeEncodeError)."""
    folder = tmp_path / "données"
    synthetic.write_ratings_csv(folder / "ratings.csv", users=100, items=200, interactions_per_user_mean=20, seed=0)
    command = shlex.join([sys.executable, str(ROOT / "convert.py"), "--path", str(folder / "ratings.csv"),
                          "--output", str(folder / "cache"), "--negatives", "20"])  # its progress bar asks stderr
    redirect = {"stderr closed": "2>&-", "stdout closed": ">&-", "stdout on a full device": "> /dev/full"}.get(case, "")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"} if case.startswith("a terminal") else None
    job = subprocess.run(["bash", "-c", f"{command} {redirect}"], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert "Traceback" not in job.stderr
    assert (folder / "cache" / "metadata.json").exists()  # the last line is printed once the cache is written
    if case == "stdout closed":  # as coreutils' `echo hi >&-`: an error, where Python would drop the output
        assert job.returncode == 1 and job.stderr == "convert.py: stopped: its standard output is closed (>&-): " \
            "give it one (> FILE, or > /dev/null to drop it)\n"
    elif case == "stdout on a full device":
        assert job.returncode == 1 and job.stderr == "convert.py: stopped: writing its output failed (No space " \
            "left on device): free some space, or send it elsewhere\n"
    else:
        assert job.returncode == 0, job.stderr
    if case.startswith("a terminal"):
        assert "donn\\xe9es" in job.stdout


@pytest.mark.slow
def test_a_training_run_whose_output_is_closed_stops_and_leaves_nothing(tmp_path):
    cache = make_tiny_cache(tmp_path / "cache")
    argv = [sys.executable, ROOT / "ncf.py", "--data", cache, "-e", "3", "--no_progress", "--log_path",
            tmp_path / "run.jsonl", "--checkpoint_dir", tmp_path / "ck"]
    job = subprocess.Popen([str(a) for a in argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    job.stdout.readline()
    job.stdout.close()  # `ncf.py ... | head -1`
    assert job.wait(timeout=300) == 141
    assert job.stderr.read().splitlines()[-1] == "ncf.py: stopped: its output was closed (the command reading it ended)"
    assert not (tmp_path / "run.jsonl").exists() and not (tmp_path / "ck").exists()


def blocked_signals(pid):
    """The signals blocked by `pid`'s main thread, from /proc (the SigBlk mask)."""
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        mask = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    return {number for number in range(1, 65) if mask >> (number - 1) & 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_during_start_up_is_one_line_exit_130(tmp_path, name):
    """A signal that comes while ncf.py is still starting (torch's import takes seconds; the re-execution with
    jemalloc is part of it) ends it as one later would: one line, status 130, nothing written. Raised inside
    torch's import, Ctrl-C had been swallowed there (the run went on and ended 0), or turned into another error;
    SIGTERM had ended it with no word. The signal is sent as soon as start-up holds it: deterministic."""
    cache = make_tiny_cache(tmp_path / "cache")
    argv = [sys.executable, ROOT / "ncf.py", "--data", cache, "-e", "1", "--no_progress", "--log_path",
            tmp_path / "run.jsonl", "--checkpoint_dir", tmp_path / "ck"]
    # Python's Ctrl-C handler even under a shell without job control, whose background jobs ignore SIGINT.
    job = subprocess.Popen([str(a) for a in argv], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    signal_number = getattr(signal, name)
    while job.poll() is None and signal_number not in blocked_signals(job.pid):
        time.sleep(0.001)
    job.send_signal(signal_number)
    out, err = job.communicate(timeout=300)
    assert (job.returncode, err) == (130, "ncf.py: interrupted\n"), out
    assert not (tmp_path / "run.jsonl").exists() and not (tmp_path / "ck").exists()


# ---- the real command lines --------------------------------------------------------------------

def start_when_ready(module, step, argv, tmp_path):
    """Start `module`.main(argv) in a fresh interpreter; return once main has first reached `step`,
    where it waits (up to 60 s) for the signal the test sends: on a loaded machine the work itself
    could otherwise end before the signal arrives."""
    # Python's Ctrl-C handler even where the tests run as a background job, whose children inherit an ignored
    # SIGINT (a shell without job control does that): the test sends what a terminal's Ctrl-C sends.
    code = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = [{str(ROOT / (module + '.py'))!r}]
sys.path.insert(0, {str(ROOT)!r})
import {module}
step = {module}.{step}

def announce(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(60)
    return step(*args, **kwargs)

{module}.{step} = announce
{module}.main({[str(a) for a in argv]!r})
"""
    job = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    assert job.stdout.readline().strip() == "ready"
    return job


@pytest.mark.slow
@pytest.mark.parametrize("module", ["convert", "synthetic"])
def test_sigint_is_one_line_exit_130_and_leaves_nothing(tmp_path, module):
    if module == "convert":
        source = tmp_path / "in" / "ratings.csv"
        synthetic.write_ratings_csv(source, users=300, items=200, interactions_per_user_mean=30, seed=0)
        old = make_tiny_cache(tmp_path / "old")
        shutil.copytree(old, tmp_path / "cache")  # a cache of ours to be replaced: it must survive
        argv = ["--path", source, "--output", tmp_path / "cache", "--no_progress"]
    else:
        argv = ["--output", tmp_path / "out" / "ratings.csv", "--preset", "realistic"]
    before = snapshot(tmp_path)
    # Interrupted mid-write: after the first cache file / the first block of rows is in the temporary.
    job = start_when_ready(module, "file_record" if module == "convert" else "csv_bytes", argv, tmp_path)
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, (out, err)
    assert err.strip().splitlines() == [f"{module}.py: interrupted"]
    assert snapshot(tmp_path) == before  # no partial output; the old cache as it was
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow
def test_a_real_write_failure_is_one_line_exit_1_and_keeps_the_old_cache(tmp_path):
    old = make_tiny_cache(tmp_path / "old")  # ratings.csv there is ~190 kB: each cache file well past 20 kB
    cache = shutil.copytree(old, tmp_path / "cache")
    before = snapshot(cache)
    result = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--path", str(old.parent / "ratings.csv"),
                             "--output", str(cache), "--negatives", "50", "--seed", "4", "--no_progress"],
                            capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300, check=False)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "Traceback" not in result.stderr, lines
    assert snapshot(cache) == before
    assert sorted(os.listdir(tmp_path)) == ["cache", "old"]


@pytest.mark.slow
def test_prepare_refuses_a_folder_it_did_not_write_before_any_work(tmp_path, run_cli, assert_user_error):
    mine = tmp_path / "data" / "cache" / "synthetic"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    result = run_cli(["prepare_dataset.sh", "synthetic"], env={"DATA_DIR": str(tmp_path / "data")}, cwd=tmp_path)
    assert_user_error(result, str(mine), "not a convert cache")
    assert snapshot(tmp_path) == {"data/cache/synthetic/notes.txt": b"mine"}  # nothing generated either


@pytest.mark.slow
def test_download_never_deletes_a_folder_or_zip_it_did_not_write(tmp_path, run_cli, assert_user_error):
    data = tmp_path / "data"
    (data / "ml-100k").mkdir(parents=True)
    (data / "ml-100k" / "notes.txt").write_text("mine")
    env = {"MOVIELENS_URL": "http://127.0.0.1:9"}  # never reached: both are refused before downloading
    assert_user_error(run_cli(["download_dataset.sh", "ml-100k", data], env=env), "ml-100k", "move it away")
    (data / "ml-1m.zip").write_bytes(b"a zip of mine")
    assert_user_error(run_cli(["download_dataset.sh", "ml-1m", data], env=env), "ml-1m.zip", "MD5")
    assert snapshot(data) == {"ml-100k/notes.txt": b"mine", "ml-1m.zip": b"a zip of mine"}


@pytest.mark.slow
def test_stability_command_line_refuses_a_foreign_folder_before_training(tmp_path, run_cli, assert_user_error):
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    result = run_cli(["benchmarks/stability.py", "--data", tmp_path / "data", "--output", tmp_path / "runs"])
    assert_user_error(result, "--output", "did not write")
    assert snapshot(tmp_path / "runs") == {"notes.txt": b"mine"}
