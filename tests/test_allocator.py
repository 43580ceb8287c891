"""allocator.py: the project's commands re-execute themselves once with jemalloc preloaded where it is installed,
unless the user chose (an LD_PRELOAD set, even empty; their MALLOC_CONF kept), and never a program that only
imports the project's modules."""
import os
import subprocess
import sys

import pytest
from helpers import ROOT, event_of

import allocator

LIBRARY = "/opt/lib/libjemalloc.so.2"


@pytest.mark.parametrize("main", ["ncf.py", "tune.py", "benchmarks/throughput.py"])
def test_the_projects_commands_are_preloaded_with_the_guides_settings(main):
    environ = allocator.preload_environment({"PATH": "/bin"}, str(ROOT / main), LIBRARY)
    assert environ == {"PATH": "/bin", "LD_PRELOAD": LIBRARY, "MALLOC_CONF": allocator.JEMALLOC_CONF}
    assert "dirty_decay_ms:-1" in allocator.JEMALLOC_CONF  # freed memory is kept: that is the whole point


def test_the_commands_are_every_script_with_a_main_block():
    scripts = [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    with_main = {str(p.relative_to(ROOT)) for p in scripts if 'if __name__ == "__main__":' in p.read_text()}
    assert set(allocator.COMMANDS) == with_main


def test_a_users_own_script_beside_the_commands_is_not_one(tmp_path):
    """Saved in the repository's folder, re-executed it would run its first lines twice."""
    for mine in ("my_experiment.py", "benchmarks/my_benchmark.py", "tests/conftest.py"):
        assert allocator.preload_environment({}, str(ROOT / mine), LIBRARY) is None


def test_the_users_malloc_conf_is_kept():
    environ = allocator.preload_environment({"MALLOC_CONF": "narenas:1"}, str(ROOT / "ncf.py"), LIBRARY)
    assert environ["MALLOC_CONF"] == "narenas:1" and environ["LD_PRELOAD"] == LIBRARY


@pytest.mark.parametrize("preload", ["", "/usr/lib/libtcmalloc.so.4"])
def test_an_ld_preload_the_user_set_is_their_choice(preload):
    assert allocator.preload_environment({"LD_PRELOAD": preload}, str(ROOT / "ncf.py"), LIBRARY) is None


def test_no_library_no_re_execution():
    assert allocator.preload_environment({}, str(ROOT / "ncf.py"), None) is None


@pytest.mark.parametrize("where", ["elsewhere", "python -c"])
def test_programs_that_import_the_modules_are_left_alone(tmp_path, where):
    main = {"elsewhere": str(tmp_path / "ncf.py"), "python -c": None}
    assert allocator.preload_environment({}, main[where], LIBRARY) is None


def test_a_link_to_a_command_is_the_command(tmp_path):
    (tmp_path / "train.py").symlink_to(ROOT / "ncf.py")
    assert allocator.preload_environment({}, str(tmp_path / "train.py"), LIBRARY)["LD_PRELOAD"] == LIBRARY


def _elf(bits=64, kind=3, machine=None):
    """An ELF header like this interpreter's, with another class (32 bits), type (2: an executable) or machine."""
    own = bytearray(open(sys.executable, "rb").read(20))
    own[4] = 1 if bits == 32 else own[4]
    own[16:18] = kind.to_bytes(2, "little" if own[5] == 1 else "big")
    own[18:20] = machine or own[18:20]
    return bytes(own) + bytes(44)


def test_the_library_is_found_in_the_first_folder_that_holds_it(tmp_path):
    folders = [tmp_path / name for name in "abcd"]
    for folder in folders:
        folder.mkdir()
    assert allocator.find_jemalloc(folders) is None
    (folders[0] / "libjemalloc.so").write_bytes(_elf())  # the -dev package's link name: not the runtime library
    (folders[1] / "libjemalloc.so.2").write_bytes(b"")  # damaged: the loader would print an error in every command
    for folder in folders[2:]:
        (folder / "libjemalloc.so.2").write_bytes(_elf())
    assert allocator.find_jemalloc(folders) == str(folders[2] / "libjemalloc.so.2")


@pytest.mark.parametrize("what", ["folder", "fifo", "32 bits", "executable", "other machine", "not ELF", "truncated",
                                  "space in path", "colon in path"])
def test_a_file_the_loader_cannot_preload_is_no_library(tmp_path, what):
    folder = tmp_path / {"space in path": "my envs", "colon in path": "a:b"}.get(what, "lib")
    folder.mkdir()
    path = folder / "libjemalloc.so.2"
    content = {"32 bits": _elf(bits=32), "executable": _elf(kind=2), "other machine": _elf(machine=b"\xb7\x00"),
               "not ELF": b"#!/bin/sh\n" * 10, "truncated": _elf()[:12]}.get(what, _elf())
    if what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)  # reading it would block forever
    else:
        path.write_bytes(content)
    assert allocator.find_jemalloc([folder]) is None


NCF = str(ROOT / "ncf.py")


@pytest.mark.parametrize(("orig_argv", "main_file", "main_name", "started"), [
    (["python", NCF, "-e", "1"], NCF, None, True),
    (["python", "-u", "-X", "importtime", "-W", "ignore", "-Wd", "-OO", NCF], NCF, None, True),
    (["python", "--check-hash-based-pycs", "always", "-uB", NCF], NCF, None, True),
    (["/usr/bin/python3", "-m", "ncf", "-e", "1"], NCF, "ncf", True),
    (["python", "-u", "-mncf"], NCF, "ncf", True),
    (["python", "-um", "ncf"], NCF, "ncf", True),
    (["python", "-m", "other", NCF], NCF, "ncf", False),
    (["python", "-m", "pdb", NCF], NCF, None, False),  # pdb's __main__ has no spec: left alone, never run twice
    (["python", "user.py"], NCF, None, False),  # user.py ran ncf.py through runpy: re-executing would rerun user.py
    (["python", "user.py", NCF], NCF, None, False),
    (["python", "-c", NCF], NCF, None, False),  # -c's value is code, whatever it reads like
    (["python", "-uc", NCF], NCF, None, False),
    (["python", "-c", "import sys", NCF], NCF, None, False),  # NCF is sys.argv[1] of the code
    (["python", "-", NCF], "<stdin>", None, False),
    (["python", "-", NCF], NCF, None, False),
    (["python", "-W"], NCF, None, False),
    (["python", "--check-hash-based-pycs"], NCF, None, False),
    (["python", "-m"], NCF, "ncf", False),
    (["python"], None, None, False),
])
def test_only_the_script_the_interpreter_was_started_with_is_re_executed(orig_argv, main_file, main_name, started):
    assert allocator.started_script(main_file, main_name, orig_argv) == (main_file if started else None)


@pytest.mark.parametrize("multiarch", ["x86_64-linux-gnu", None])
def test_the_library_folders_are_the_loaders_then_the_environments(monkeypatch, multiarch):
    monkeypatch.setattr(allocator.sysconfig, "get_config_var", {"MULTIARCH": multiarch}.get)
    monkeypatch.setenv("CONDA_PREFIX", "/conda")
    monkeypatch.setenv("VIRTUAL_ENV", "/venv")
    loaders = [f"/usr/lib/{multiarch}"] * bool(multiarch) + ["/usr/lib64", "/usr/lib", "/usr/local/lib"]
    assert allocator.library_folders() == [*loaders, "/conda/lib", "/venv/lib"]
    monkeypatch.delenv("CONDA_PREFIX")
    monkeypatch.setenv("VIRTUAL_ENV", "")
    assert allocator.library_folders()[-1] == "/usr/local/lib"


@pytest.mark.parametrize(("library", "malloc"), [
    ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
    ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "tcmalloc"),
    ("/lib/x86_64-linux-gnu/libc.so.6", "glibc"),
    ("/lib64/libc-2.17.so", "glibc"),
    ("/opt/lib/libmimalloc.so.2", "libmimalloc.so.2"),
])
def test_the_malloc_is_named_by_the_library_that_defines_it(library, malloc):
    assert allocator.malloc_name(library) == malloc


def test_this_pytest_process_was_not_re_executed():
    assert allocator.in_use() == ("jemalloc" if "libjemalloc" in os.environ.get("LD_PRELOAD", "") else "glibc")


def test_the_first_of_two_preloaded_mallocs_is_the_one_named(tmp_path):
    """Two libraries in LD_PRELOAD: the first defines malloc. Real libraries are needed: libc stands in for a
    second malloc (preloading it changes nothing), so the answer must be the first one's."""
    jemalloc = allocator.find_jemalloc(allocator.library_folders())
    if jemalloc is None:
        pytest.skip("jemalloc is not installed (.ci/run installs it)")
    libc = next(path for path in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6", "/lib64/libc.so.6")
                if os.path.exists(path))
    code = "import allocator; print(allocator.in_use())"
    for preload, malloc in ((f"{jemalloc} {libc}", "jemalloc"), (f"{libc} {jemalloc}", "glibc")):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": preload}, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.strip() == malloc, (preload, result.stdout, result.stderr)


@pytest.mark.slow
def test_a_training_run_says_which_malloc_served_it(tiny_cache, tmp_path):
    """ncf.py names its malloc in its setup lines and its log's config record: jemalloc where the library is
    installed (CI installs it), glibc's with LD_PRELOAD set empty. The interpreter's own flags (-u here) and
    the arguments survive the re-execution."""
    installed = "jemalloc" if allocator.find_jemalloc(allocator.library_folders()) else "glibc"
    unset = {name: value for name, value in os.environ.items() if name not in ("LD_PRELOAD", "MALLOC_CONF")}
    for name, env, malloc in (("unset", unset, installed), ("empty", {**unset, "LD_PRELOAD": ""}, "glibc")):
        log = tmp_path / f"{name}.json"
        args = [sys.executable, "-u", ROOT / "ncf.py", "--data", tiny_cache, "-e", "1", "-b", "2048", "--factors", "4",
                "--layers", "16", "8", "--opt_level", "O0", "--no_progress", "--log_path", log,
                "--checkpoint_dir", tmp_path / name]
        result = subprocess.run([str(a) for a in args], env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"| malloc {malloc}\n" in result.stdout, result.stdout
        assert event_of(log, "config")["malloc"] == malloc


def test_jemalloc_is_installed_where_ci_runs():
    """.ci/run installs Debian's libjemalloc2, so that the suite's command lines run as users' do."""
    if not os.environ.get("CI_EXPECTS_JEMALLOC"):
        pytest.skip("only where .ci/run set CI_EXPECTS_JEMALLOC=1")
    assert allocator.find_jemalloc(allocator.library_folders())
