"""Shared command-line plumbing: thread settings and user-facing errors.

Import this module before torch in every entrypoint. On small shared CPUs, OpenMP threads that spin
while waiting were measured to slow a 2-thread training step up to 30x; a passive wait policy cures
it, and it only takes effect if set before the OpenMP runtime starts (i.e. before `import torch`).
"""
import contextlib
import functools
import os
import shutil
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Transparent huge pages for torch's large CPU tensors: a training step allocates and frees GBs of
# activations, and with 4 KiB pages their page faults cost more system time than the matmuls (a 65,536
# batch step: 10x fewer page faults, ~25% faster). torch reads this at its first tensor of >= 2 MiB.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _one_line_warning(message, category, filename, lineno, line=None):
    prog = os.path.basename(sys.argv[0]) or "ncf"
    return f"{prog}: warning: {message}\n"


# Warnings are for users of the command lines: one line each, without a source excerpt.
warnings.formatwarning = _one_line_warning

EXIT_USER_ERROR = 2
EXIT_ENVIRONMENT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command ended by Ctrl-C


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr with exit status 2."""

    exit_status = EXIT_USER_ERROR


class EnvironmentFailure(UserError):
    """A failure of the machine, not of the input (a disk that fills up during a write): one stderr
    line, exit status 1. Raise it only after the partial output has been removed."""

    exit_status = EXIT_ENVIRONMENT_FAILURE


def main_guard(main):
    """Wrap an entrypoint so a UserError becomes one stderr line and exit status 2 (1 for an
    EnvironmentFailure), and Ctrl-C one line `PROG: interrupted` and exit status 130, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            _report(f"error: {err}")
            sys.exit(err.exit_status)
        except KeyboardInterrupt:
            _report("interrupted")
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _report(message):
    # Under torchrun every rank meets the same bad input: only global rank 0 says so. A RANK left in
    # the environment outside a launch (WORLD_SIZE unset or 1) must not silence the one process.
    if not _secondary_rank():
        prog = os.path.basename(sys.argv[0]) or "ncf"
        print(f"{prog}: {message}", file=sys.stderr)


def _secondary_rank():
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
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def remove_stale_temporaries(path):
    """Delete `PATH.tmp-PID` / `PATH.old-PID` files or folders left by a process that was killed.

    Atomic writes go through such temporaries; one whose writer is still alive is left alone.
    """
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        stem, _, pid = entry.rpartition("-")
        if stem not in (f"{name}.tmp", f"{name}.old") or not pid.isdigit() or _alive(int(pid)):
            continue
        full = os.path.join(folder, entry)
        if os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(full)


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
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        remove_stale_temporaries(output)
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
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(output):  # the previous one is kept until the new one is in place
            shutil.rmtree(old, ignore_errors=True)

