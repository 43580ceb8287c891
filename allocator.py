"""jemalloc for the project's commands on Linux, where it is installed (Debian: `apt-get install libjemalloc2`).

A CPU training step allocates and frees GBs of activations (a [2^20, 64] fp32 tensor is 256 MiB), and glibc's
malloc hands every block that large back to the kernel when it is freed, so the next step's tensors are
fresh pages: page faults and zeroing, up to 10x the cost of writing into reused memory on a VM
(benchmarks/README.md). jemalloc configured as Intel's PyTorch CPU guide configures it keeps freed memory
for the next step: samples/s at 2^20 went from 139k to 174k in fp32 and from 182k to 274k in bf16 (medians
of 3 alternated runs), for a peak RSS higher by 17% (bf16) to 39% (fp32). (torch's own launcher,
`torch.backends.xeon.run_cpu --enable-jemalloc`, gives the memory back after 10 s, and gained nothing.)

A malloc replaces glibc's only from the process's start (LD_PRELOAD), so cli.py, which every entrypoint
imports first, calls preload_jemalloc(): the command re-executes itself once, the same interpreter with the
same arguments, with jemalloc preloaded. The choice is the user's whenever they made one: an LD_PRELOAD
already in the environment, even an empty one (`LD_PRELOAD= python ncf.py ...` keeps glibc's malloc), is
left alone, and so is a MALLOC_CONF. Only the project's own commands (COMMANDS), started by the interpreter's
command line, do this: never a program that imports or runs them from inside (pytest, pdb, a user's script,
even one saved beside them), whose first lines would run twice. Child processes inherit the environment, so
they start with it.
"""
import contextlib
import ctypes
import os
import stat
import sys
import sysconfig

# Retain freed memory for reuse (never purge it) and serve large blocks from one arena: what keeps a
# step's tensors out of fresh pages. Intel's guide uses this, with decays of 9e9 ms where -1 says "never".
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIBRARY = "libjemalloc.so.2"
_HERE = os.path.dirname(os.path.realpath(__file__))
# The project's commands, by name: a user's own script saved beside them is not one (re-executed, it would run
# its own first lines twice). tests/test_allocator.py checks this is every script with a __main__ block.
COMMANDS = ("ncf.py", "tune.py", "convert.py", "synthetic.py", "inference.py", "serving.py",
            *(f"benchmarks/{name}.py" for name in ("batch_recommend_benchmark", "convert_benchmark",
                                                  "inference_benchmark", "planted_ceiling", "stability",
                                                  "sync_check", "teardown_check", "throughput")))
COMMAND_PATHS = frozenset(os.path.join(_HERE, name) for name in COMMANDS)


def library_folders():
    """Where distributions and environments put shared libraries, the loader's default places first."""
    multiarch = sysconfig.get_config_var("MULTIARCH")  # x86_64-linux-gnu on Debian and Ubuntu
    folders = [f"/usr/lib/{multiarch}"] if multiarch else []
    folders += ["/usr/lib64", "/usr/lib", "/usr/local/lib"]
    environments = (os.environ.get(name) for name in ("CONDA_PREFIX", "VIRTUAL_ENV"))
    return folders + [os.path.join(prefix, "lib") for prefix in environments if prefix]


def find_jemalloc(folders):
    """The path of the first libjemalloc.so.2 in `folders` that the loader can preload, or None (see
    _preloadable): a wrong file would make the loader print an error at the start of every command and child."""
    candidates = (os.path.join(folder, LIBRARY) for folder in folders)
    return next((path for path in candidates if _preloadable(path)), None)


def _preloadable(path):
    """A regular file (a FIFO would block the read) whose ELF header says: a shared object for this interpreter's
    class, byte order and machine, at a path LD_PRELOAD can name (it splits on spaces and colons)."""
    if " " in path or ":" in path:
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as library, open(sys.executable, "rb") as interpreter:
            header, own = library.read(20), interpreter.read(20)
    except OSError:
        return False
    # e_ident: magic (4 bytes), class, byte order, ...; then e_type (2 bytes, 3 = shared object), e_machine (2).
    byteorder = "little" if header[5:6] == b"\x01" else "big"
    shared_object = int.from_bytes(header[16:18], byteorder) == 3
    return len(header) == 20 and header[:4] == b"\x7fELF" and header[4:6] == own[4:6] and \
        header[18:20] == own[18:20] and shared_object


def started_script(main_file, main_name, orig_argv):
    """`main_file` when the interpreter's own command line ran it (`python [options] FILE`, or `python -m
    NAME` with the main module's spec name `main_name`), else None: a program that runs it from inside
    (runpy, with sys.argv patched) would, re-executed, run again from its own start."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "-":  # the program comes from stdin, which a re-execution could not read again
            return None
        if arg.startswith("--"):  # --check-hash-based-pycs takes a value; other long options none
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        if not arg.startswith("-"):
            same = main_file is not None and os.path.realpath(arg) == os.path.realpath(main_file)
            return main_file if same else None
        for i, flag in enumerate(arg[1:], start=1):  # a cluster of short options, such as -uB or -mncf
            if flag in "WXcm":  # these take a value: the rest of the cluster, or the next argument
                value = arg[i + 1 :] or next(args, None)
                if flag == "c":
                    return None
                if flag == "m":
                    return main_file if main_name is not None and value == main_name else None
                break
    return None


def preload_environment(environ, main_file, library):
    """The environment to re-execute in with `library` preloaded, or None to run on as is: no library, an
    LD_PRELOAD already set (the user's choice, even empty), or a main program that is not one of the
    project's commands (`main_file`, from started_script, None for `python -c`, stdin and the interpreter's
    prompt)."""
    if library is None or "LD_PRELOAD" in environ or not is_command(main_file):
        return None
    return {**environ, "LD_PRELOAD": library, "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def is_command(main_file):
    """Whether `main_file` is one of the project's COMMANDS (a link to one is the command)."""
    return bool(main_file) and os.path.realpath(main_file) in COMMAND_PATHS


def started_command():
    """Whether this process runs one of the project's COMMANDS, started by the interpreter's own command line
    (started_script): what re-executes itself here, and holds Ctrl-C until its main runs (cli.py)."""
    main = sys.modules.get("__main__")
    main_name = getattr(getattr(main, "__spec__", None), "name", None)
    return is_command(started_script(getattr(main, "__file__", None), main_name, sys.orig_argv))


def preload_jemalloc():
    """Re-execute this process with jemalloc preloaded when preload_environment says so; it returns only when
    not (then glibc's malloc serves the run, which is slower, never wrong). Call it before anything has
    started: it replaces the process."""
    if sys.platform != "linux" or not sys.executable:
        return
    main_file = sys.modules["__main__"].__file__ if started_command() else None
    environ = preload_environment(os.environ, main_file, find_jemalloc(library_folders()))
    if environ is None:
        return
    # sys.executable, not the argv[0] the user typed: a bare "python" would be looked up in PATH again.
    argv = [sys.executable, *sys.orig_argv[1:]]
    with contextlib.suppress(OSError):  # no exec here (a sandbox): run on with glibc's malloc
        os.execve(sys.executable, argv, environ)


def in_use():
    """The malloc serving this process: the library that defines the `malloc` the program's calls resolve to
    (the first of several preloaded ones wins), named by malloc_name; "system" where that cannot be asked
    (not Linux, or no dladdr)."""
    try:
        process = ctypes.CDLL(None)
        info = _DlInfo()
        found = process.dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info))
    except (OSError, AttributeError):
        return "system"
    return malloc_name(info.dli_fname.decode(errors="replace")) if found and info.dli_fname else "system"


def malloc_name(library):
    """"jemalloc", "tcmalloc", "glibc" (libc itself), else the library's file name."""
    name = os.path.basename(library)
    known = {"libjemalloc": "jemalloc", "libtcmalloc": "tcmalloc", "libc.so": "glibc", "libc-": "glibc"}
    return next((malloc for prefix, malloc in known.items() if name.startswith(prefix)), name)


class _DlInfo(ctypes.Structure):  # dladdr's answer (<dlfcn.h>)
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]
