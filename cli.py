"""Shared command-line plumbing: thread settings, user-facing errors, and the one owner of every write.

Import this module before torch in every entrypoint. On small shared CPUs, OpenMP threads that spin
while waiting were measured to slow a 2-thread training step up to 30x; a passive wait policy cures
it, and it only takes effect if set before the OpenMP runtime starts (i.e. before `import torch`).
"""
# isort: off  (the signals are held first, before the imports below take their ~20 ms)
import signal
import threading

import allocator

# Ctrl-C and SIGTERM wait (blocked) from here until main_guard runs the command. Raised while torch was being
# imported, Ctrl-C was seen swallowed there (the run went on and ended with status 0), turned into another
# error (a RecursionError reported as a bad --layers), or into an abort in C++; SIGTERM ended the process
# with no word. A signal that came during the seconds of start-up is now reported as any other: one line,
# status 130. The mask survives the re-execution below, so its start-up is covered too. Only a project
# command started as such holds them: a program that imports these modules (pytest, a user's) keeps its own.
# (The interpreter's own start-up and the command's first import, about 15 ms, stay uncovered.)
HELD_AT_START = (signal.SIGINT, signal.SIGTERM)
if allocator.started_command() and threading.current_thread() is threading.main_thread():
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

# isort: on


class ClosedOutput(io.TextIOBase):
    """sys.stdout where the command was started with it closed (`>&-`): writing is an error, as for coreutils'
    `echo hi >&-`, so that a command whose product is its output (`inference.py recommend`) never ends 0 with
    the product gone (main_guard: one line, status 1)."""

    def writable(self):
        return True

    def write(self, text):
        raise OSError(errno.EBADF, "its standard output is closed")


def _open_closed_standard_streams():
    """Give a standard stream that was closed when the command started (`2>&-`) /dev/null as its file descriptor,
    and a Python stream: /dev/null for stdin and stderr, ClosedOutput for stdout. Python leaves sys.stderr None
    there: the first progress-bar check (`sys.stderr.isatty()`) ended the command with status 1 and no word, and
    the first file it opened took descriptor 2, so that a native warning would have been written into that file
    (seen: the checkpoint folder's lock file)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)  # taken since (rare): the process's own file, left alone
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        stream = ClosedOutput() if name == "stdout" else open(os.devnull, mode, encoding="utf-8")  # kept to the end
        setattr(sys, name, stream)


if allocator.started_command():
    _open_closed_standard_streams()
    # A path the terminal's encoding cannot spell (PYTHONIOENCODING=ascii, a folder named données) is printed
    # escaped: its strict default ended convert.py with a traceback after its output was written.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Transparent huge pages for torch's large CPU tensors: a training step allocates and frees GBs of
# activations, and with 4 KiB pages their page faults cost more system time than the matmuls (a 65,536
# batch step: 10x fewer page faults, ~25% faster). torch reads this at its first tensor of >= 2 MiB.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
allocator.preload_jemalloc()  # may re-execute the command with jemalloc preloaded (allocator.py says why)


def _one_line_warning(message, category, filename, lineno, line=None):
    prog = os.path.basename(sys.argv[0]) or "ncf"
    return f"{prog}: warning: {message}\n"


# Warnings are for users of the command lines: one line each, without a source excerpt.
warnings.formatwarning = _one_line_warning

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C
EXIT_OUTPUT_CLOSED = 141  # 128 + SIGPIPE, what shells report for a writer whose reader ended (`yes | head`)
# A write to a stream that the device refused (`> /dev/full`, a full disk under a redirected log): the project's
# own files say so themselves (EnvironmentFailure), a stream has no file name to say it with.
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)
LOCK_FILE = ".lock"  # in an output folder, held (hold_lock) by the run writing there


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr with exit status 2."""

    exit_status = EXIT_USER_ERROR


class EnvironmentFailure(UserError):
    """A failure of the machine, not of the input (a disk that fills up during a write): one stderr
    line, exit status 1. Raise it only after the partial output has been removed."""

    exit_status = EXIT_ENVIRONMENT_FAILURE


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, once: not when the help text already states it in words, nor for a
    flag that has none (None) or is off unless given (False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag a UserError like any other bad input: one stderr line, exit status 2, no usage
    dump (--help still prints the usage), and the defaults shown once (DefaultsFormatter). Every entrypoint's
    parser is one of these."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": DefaultsFormatter, **kwargs})

    def error(self, message):
        raise UserError(f"{message} (see --help)")


_interrupts = {"seen": False, "depth": 0}


def _interrupt(signum, frame):
    """The handler of Ctrl-C (and of SIGTERM where main_guard takes it): KeyboardInterrupt, remembered. Raised
    inside a finaliser or a weakref callback, a KeyboardInterrupt is only printed ("Exception ignored in") and
    the code goes on: tune.py was seen running its whole search after such a Ctrl-C and ending 0, the warning
    hidden in a trial's captured stderr. Remembered, it still ends the command (raise_if_interrupted)."""
    _interrupts["seen"] = True
    raise KeyboardInterrupt


def _quiet_remembered_interrupts(unraisable, report=sys.unraisablehook):
    """sys.unraisablehook in a guarded command: a KeyboardInterrupt raised where Python cannot raise it (a
    finaliser) is remembered (_interrupt) and ends the command with one line; Python's own "Exception ignored"
    traceback of it is left out. Anything else is reported as Python reports it."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        return
    report(unraisable)


def raise_if_interrupted():
    """KeyboardInterrupt if Ctrl-C (or SIGTERM, where it is Ctrl-C) came during main_guard's command, even one
    that was swallowed (see _interrupt): long loops call this at each step."""
    if _interrupts["seen"]:
        raise KeyboardInterrupt


def _take_signal(signum):
    """Install _interrupt for `signum` unless the command (or its parent: `nohup`, `trap '' INT`) chose
    another handler: Python's own Ctrl-C handler, or the default action. Returns the previous handler, or None
    when left alone."""
    previous = signal.getsignal(signum)
    if previous not in (signal.default_int_handler, signal.SIG_DFL):
        return None
    signal.signal(signum, _interrupt)
    return previous


def _ignore_signals_to_exit():
    """Ignore Ctrl-C and SIGTERM from here to the process's end, in a project command: its work is over or being
    reported, so a late one (a second press) changes nothing, where raised it printed a traceback from the
    report, an atexit callback or the threads' shutdown, or ended a finished run as killed with no word. Ignored,
    not blocked: blocking holds them for the calling thread only, and the process's signals then go to a thread
    started since (OpenMP's, torch's). A process that then hangs in its shutdown is ended by SIGKILL (or Ctrl-\\)."""
    if allocator.started_command() and threading.current_thread() is threading.main_thread():
        for signum in HELD_AT_START:
            signal.signal(signum, signal.SIG_IGN)


def main_guard(main):
    """Wrap an entrypoint so a UserError becomes one stderr line and exit status 2 (1 for an
    EnvironmentFailure), and Ctrl-C or SIGTERM one line `PROG: interrupted` and exit status 130, no traceback:
    SIGTERM is Ctrl-C here (its temporaries removed, a child process stopped) unless the command handles it
    itself (ncf.py's training, tune.py). A signal the parent ignores stays ignored."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        taken = {signum: _take_signal(signum) for signum in HELD_AT_START} if main_thread else {}
        hook = sys.unraisablehook
        if taken.get(signal.SIGINT) is not None:  # Ctrl-C is _interrupt's, which remembers it
            sys.unraisablehook = _quiet_remembered_interrupts
        _interrupts["depth"] += 1
        try:
            if main_thread:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_AT_START)  # one that came meanwhile: raised here
            result = main(*args, **kwargs)
            raise_if_interrupted()  # one swallowed on the way: the command did not do what it was asked
            return result
        except KeyboardInterrupt:
            _ignore_signals_to_exit()
            _report("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            _ignore_signals_to_exit()
            if not silence_closed_outputs():
                raise  # a pipe of the command's own, not its output: a failure to see whole
            _report("stopped: its output was closed (the command reading it ended)")
            sys.exit(EXIT_OUTPUT_CLOSED)
        except OSError as err:
            if (line := _output_failure(err)) is None:
                raise
            _ignore_signals_to_exit()
            _silence_stdout()  # what is still buffered would fail again at exit
            _report(line)
            sys.exit(EXIT_ENVIRONMENT_FAILURE)
        except Exception as err:
            # A Ctrl-C wins over what it caused: torch.save's writer turns one into a RuntimeError (a "full disk").
            _ignore_signals_to_exit()
            if _interrupts["seen"]:
                _report("interrupted")
                sys.exit(EXIT_INTERRUPTED)
            if not isinstance(err, UserError):
                raise
            _report(f"error: {err}")
            sys.exit(err.exit_status)
        finally:
            _ignore_signals_to_exit()
            sys.unraisablehook = hook
            _interrupts["depth"] -= 1
            if not _interrupts["depth"]:
                _interrupts["seen"] = False  # a program calling several commands (the tests) starts each afresh
            # Put back what was there unless the command chose otherwise meanwhile: a rank of a stopped ncf.py run
            # ignores torchrun's SIGTERM while it leaves, and restoring the default would let it end as -15.
            for signum, previous in taken.items():
                if previous is not None and signal.getsignal(signum) is _interrupt:
                    signal.signal(signum, previous)

    return wrapper


def silence_closed_outputs():
    """Point stdout and stderr, where their reader has ended (`ncf.py | head -1`), at /dev/null, so that
    nothing more fails on them (Python's last flush included); whether either was."""
    closed = []
    for fd in (1, 2):
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poll.poll(0)):  # a pipe without a reader
            closed.append(fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
    return bool(closed)


def _output_failure(err):
    """The line that reports an OSError of the command's standard output, or None for any other."""
    if err.errno == errno.EBADF and isinstance(sys.stdout, ClosedOutput):
        return "stopped: its standard output is closed (>&-): give it one (> FILE, or > /dev/null to drop it)"
    if err.errno in WRITE_FAILURES and err.filename is None:
        return f"stopped: writing its output failed ({err.strerror}): free some space, or send it elsewhere"
    return None


def _silence_stdout():
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # the process keeps it to its end
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _report(message):
    # Under torchrun every rank meets the same bad input: only global rank 0 says so. A RANK left in
    # the environment outside a launch (WORLD_SIZE unset or 1) must not silence the one process.
    if not _secondary_rank():
        prog = os.path.basename(sys.argv[0]) or "ncf"
        with contextlib.suppress(OSError):  # a stderr that fails too (`2>/dev/full`): the status still says it
            print(f"{prog}: {message}", file=sys.stderr, flush=True)


def _secondary_rank():
    """A rank other than 0 of a real launch: torchrun (and torch.distributed.launch) set MASTER_ADDR and
    MASTER_PORT beside RANK and WORLD_SIZE; stray RANK/WORLD_SIZE alone must not silence the one process."""
    if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return False
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


@contextlib.contextmanager
def atomic_file(path):
    """Open a temporary file beside `path` for writing (binary); renamed onto `path` only once the block
    has finished and the data is on disk, so a crash or Ctrl-C never leaves a half-written `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    claim_temporary(tmp)
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        release_temporary(tmp)


# A temporary (PATH.tmp-PID, PATH.old-PID) is this project's only while PATH.tmp-PID.partial, written
# before it, says so in its content: a killed run's temporaries are then deleted by the next run, and a
# user's file that merely looks like one (model.pth.old-2023) is never touched.
PARTIAL_SUFFIX = ".partial"
PARTIAL_CONTENT = "a temporary of this project's atomic writes"


def _is_our_temporary(tmp):
    try:
        with open(tmp + PARTIAL_SUFFIX, encoding="utf-8") as f:
            record = json.loads(f.read(1000))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("created_by") == PARTIAL_CONTENT and \
        record.get("temporary") == os.path.basename(tmp)


def _remove_temporary(tmp):
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    release_temporary(tmp)


def claim_temporary(tmp):
    """Write the proof that `tmp` is this project's temporary, before it exists. A path in the way that is
    not a temporary of ours (a user's file of that name) is refused, not replaced."""
    if os.path.lexists(tmp) or os.path.lexists(tmp + PARTIAL_SUFFIX):
        if not _is_our_temporary(tmp):
            raise EnvironmentFailure(f"{tmp} is in the way of a temporary this project needs, and this project did "
                                     "not write it: move it away and rerun")
        _remove_temporary(tmp)  # one of ours, of a dead process that had this pid
    with open(tmp + PARTIAL_SUFFIX, "x", encoding="utf-8") as f:
        f.write(json.dumps({"created_by": PARTIAL_CONTENT, "temporary": os.path.basename(tmp)}))


def release_temporary(tmp):
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp + PARTIAL_SUFFIX)


def remove_stale_temporaries(path):
    """Delete `PATH.tmp-PID` / `PATH.old-PID` files or folders left by a process that was killed, when their
    .partial proof says they are this project's (see claim_temporary); a live writer's are left alone."""
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        temporary = entry.removesuffix(PARTIAL_SUFFIX)
        stem, _, pid = temporary.rpartition("-")
        if stem not in (f"{name}.tmp", f"{name}.old") or not pid.isdigit() or _alive(int(pid)):
            continue
        full = os.path.join(folder, temporary)
        if _is_our_temporary(full):
            _remove_temporary(full)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_path(path, flag, folder=False):
    """Raise a UserError unless `path` can be written as a file (a folder with folder=True).

    Run before any work: what is at `path` must be of the right kind (a folder where a file goes,
    a file where a folder goes, or a device such as /dev/full are refused), and the nearest existing
    folder above it must be a writable folder (the missing ones below it are created later). Whether
    an existing `path` may be replaced is the caller's rule.
    """
    full = os.path.abspath(path)
    if os.path.lexists(full):
        if folder and not os.path.isdir(full):
            what = "a file" if os.path.isfile(full) else "a device or other special file"
            raise UserError(f"{flag} {path} is {what}, not a folder: choose another folder")
        if not folder and os.path.isdir(full):
            raise UserError(f"{flag} {path} is a folder: pass the path of a file to write, "
                            f"e.g. {os.path.join(path, 'NAME')}")
        if not folder and not os.path.isfile(full):
            raise UserError(f"{flag} {path} exists and is not a regular file: choose another path")
        if folder and not os.access(full, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path} is not writable: choose another folder or fix its permissions")
    above = os.path.dirname(full)
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise UserError(f"{flag} {path} cannot be created: {above} is a file, not a folder; "
                        "choose another path")
    if not os.access(above, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be created: the folder {above} is not writable; "
                        "choose another path or fix its permissions")
    return full


def holds(folder, path):
    """True iff `path` is `folder` or lies inside it (symbolic links resolved)."""
    folder, path = os.path.realpath(folder), os.path.realpath(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_own_folder(folder, names, read_marker, created_by):
    """True iff a writer whose outputs are named `names` may replace `folder`: it is empty, or it holds
    nothing but regular files of those names and its marker (read_marker(folder), a dict) says
    `created_by` wrote it, so that replacing it loses nothing else."""
    entries = os.listdir(folder)
    if not entries:
        return True
    if not all(name in names and os.path.isfile(os.path.join(folder, name))
               and not os.path.islink(os.path.join(folder, name)) for name in entries):
        return False
    try:
        return read_marker(folder).get("created_by") == created_by
    except (OSError, ValueError):
        return False


def check_output_folder(output, inputs, may_replace, what):
    """Refuse, before any work, an --output folder that cannot be written, that holds one of the
    `inputs` ({flag: path}), or that exists and may not be replaced (`what`: the writer's output, with
    its article, e.g. "a convert cache")."""
    check_output_path(output, "--output", folder=True)
    for flag, path in inputs.items():
        if path is not None and holds(output, path):
            raise UserError(f"--output {output} holds the input {flag} {path}, and writing {what} there would "
                            "replace it: choose another folder")
    if os.path.isdir(output) and not may_replace(output):
        raise UserError(f"--output {output} exists and is not {what} (it holds other files, or nothing saying "
                        "this project wrote it), so it is not replaced: move it away or choose another folder")


@contextlib.contextmanager
def staged_folder(output, may_replace, what):
    """Yield a sibling temporary folder to fill; once the block has finished, its files are on disk and it
    is renamed onto `output`, replacing what was there (if may_replace(output) still holds) only then.
    On any failure or Ctrl-C the temporary folder goes and whatever was at `output` stays; an OSError
    (a full disk) becomes an EnvironmentFailure naming the `what`."""
    output = os.path.abspath(output)
    tmp, old = f"{output}.tmp-{os.getpid()}", f"{output}.old-{os.getpid()}"
    claimed = []  # only these are ever removed below: a path in the way that is not ours stays
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        remove_stale_temporaries(output)
        for path in (tmp, old):
            claim_temporary(path)
            claimed.append(path)
        os.makedirs(tmp)
        yield tmp
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(output) and not may_replace(output):  # something else appeared meanwhile
            raise UserError(f"--output {output} was filled with other files while writing the {what}; nothing "
                            "was replaced: move them away and rerun")
        try:
            if os.path.exists(output):
                os.rename(output, old)
            os.rename(tmp, output)
        except BaseException:  # Ctrl-C between the two renames included
            if os.path.exists(old) and not os.path.exists(output):
                os.rename(old, output)  # put the previous one back rather than lose it
            raise
    except OSError as err:
        raise EnvironmentFailure(f"cannot write the {what} {output} ({err.strerror or err}); nothing was left "
                                 "behind: free some space or fix the folder, and rerun") from None
    finally:
        if tmp in claimed:
            shutil.rmtree(tmp, ignore_errors=True)
            release_temporary(tmp)
        if old in claimed:
            if os.path.isdir(output):  # the previous one is kept until the new one is in place
                shutil.rmtree(old, ignore_errors=True)
            if not os.path.lexists(old):
                release_temporary(old)



# ---------------------------------------------------------------------------------------------
# One owner for every write: a command writes, appends to or deletes a user-visible path only
# through the helpers below, and each asks a proof first. A proof is a function of the path that reads
# its content (a marker's "created_by", a checkpoint's own fields, a log's records): a file of the same
# name is no proof. tests/test_write_owner.py walks the source and fails on a write that bypasses them.

CREATED_BY = "created_by"  # the key of the JSON files this project writes that says which command wrote it


def json_marker(created_by):
    """A proof: the path is a JSON object whose "created_by" is `created_by` (a marker, a report)."""

    def proof(path):
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        return isinstance(content, dict) and content.get(CREATED_BY) == created_by

    proof.__doc__ = f"a JSON file written by {created_by}"
    return proof


def proven(proof, path):
    """True iff `proof(path)` holds; a proof that cannot read the path (binary, unreadable, malformed) fails."""
    try:
        return bool(proof(path))
    except Exception:  # a file its proof cannot parse, whatever the parser raises, is not ours
        return False


def may_write(path, proof):
    """The one rule: `path` may be (re)written iff nothing is there, it is an empty regular file (nothing to
    lose), or `proof` shows this project wrote it."""
    if not os.path.lexists(path):
        return True
    if os.path.islink(path) or not os.path.isfile(path):
        return False
    return os.path.getsize(path) == 0 or proven(proof, path)


def NEW_FILES_ONLY(path):
    """A proof (may_write) that nothing proves: a file already there is never replaced (empty ones aside)."""
    return False


def check_may_write(path, flag, proof, what):
    """Raise a UserError, before any work, unless `path` can be written as a file and may_write allows it.
    `what` names the content with its article ("a run log"), for the message."""
    check_output_path(path, flag)
    if not may_write(path, proof):
        raise UserError(f"{flag} {path} exists and is not {what} this project wrote, so it is not replaced: move "
                        f"it away or choose another path")
    return path


@contextlib.contextmanager
def owned_file(path, flag, proof, what):
    """atomic_file, after check_may_write: the way a command writes or replaces one of its files."""
    check_may_write(path, flag, proof, what)
    with atomic_file(path) as f:
        yield f


def open_owned_for_append(path, flag, proof, what):
    """A text file opened for appending (line-buffered), after check_may_write: logs that runs add to."""
    check_may_write(path, flag, proof, what)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, "a", buffering=1, encoding="utf-8")


def remove_owned(path, proof):
    """Delete the file `path` iff may_write allows it (a file of ours, or an empty one); True if removed."""
    if not os.path.isfile(path) or not may_write(path, proof):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return True


def remove_owned_folder(folder, names, proof):
    """Delete `folder` iff it holds nothing but regular files named in `names` for which `proof` holds
    (a file's proof gets its path) and no sub-folder: what a command wrote there and nothing else."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return False
    entries = os.listdir(folder)
    if not all(name in names and may_write(os.path.join(folder, name), proof) for name in entries):
        return False
    for name in entries:
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)
    return True


def lock_note(path):
    """A proof for lock files: empty, or the one line hold_lock writes."""
    with open(path, encoding="utf-8") as f:
        text = f.read(4096)
    return text == "" or (text.startswith("pid ") and text.count("\n") == 1 and " started " in text)


def hold_lock(path, what, proof=lock_note, holder_note=True):
    """An exclusive lock on `path` (created if needed) for as long as the returned file stays open.

    Two runs writing one checkpoint folder or one log would each report the other's files as their
    own; the second is refused, naming the holder. flock locks die with their process, so a killed
    run never leaves a stale lock. A file that exists and that `proof` does not show to be ours is
    refused before it is opened for writing.
    """
    if not may_write(path, proof):
        raise UserError(f"{what}: {path} exists and is not a file this project wrote, so it is not taken as "
                        f"a lock: move it away, or choose another {what.split()[0]}")
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() if holder_note else ""
        handle.close()
        raise UserError(f"{what} is in use by another run{f' ({holder})' if holder else ''}: wait for it to end, "
                        f"or choose another {what.split()[0]}") from None
    if holder_note:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
    return handle


# ---------------------------------------------------------------------------------------------
# One identity for every reuse: checkpoints, exports and studies record what they were made
# from as a flat dict; every reader compares it with what it is given here, through this one function.


def identity_mismatch(recorded, current):
    """The first key on which two identities disagree, as (key, recorded value, current value), or None.

    A key absent from the recorded identity (an artefact older than the key) or None on either side is
    not compared; every other key is.
    """
    recorded = recorded if isinstance(recorded, dict) else {}
    for key, value in current.items():
        if key in recorded and recorded[key] is not None and value is not None and recorded[key] != value:
            return key, recorded[key], value
    return None


def check_identity(recorded, current, what, fix):
    """Raise a UserError naming the first difference between `recorded` (what `what` was made with) and
    `current` (what it is used with now), and `fix`."""
    mismatch = identity_mismatch(recorded, current)
    if mismatch:
        key, there, here = mismatch
        raise UserError(f"{what} was made with {key} {_short(there)}, but this run has {key} {_short(here)}: {fix}")


def _short(value):
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..."
