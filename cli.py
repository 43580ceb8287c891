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


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr with exit status 2."""


def main_guard(main):
    """Wrap an entrypoint so a UserError becomes one stderr line and exit status 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            # Under torchrun every rank meets the same bad input: only global rank 0 says so.
            if os.environ.get("RANK", "0") == "0":
                prog = os.path.basename(sys.argv[0]) or "ncf"
                print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


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
