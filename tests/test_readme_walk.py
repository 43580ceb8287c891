"""The README as a newcomer walks it (issue 22): every fenced shell block of README.md and benchmarks/README.md,
run in order, command by command, in a fresh copy of the repository; each must exit 0 (or, for the commands
that need CUDA, refuse in one line where there is none), and where the text quotes a figure that a command
prints, the command must print that figure.

What runs: blocks fenced as ```bash, ```sh or ```shell (every line), or ```console (the lines that start with
"$ "). A fence without a language is refused here: mark it ```text if it is not meant to be run. Each logical
line of a block (backslash continuations joined; blank and comment lines dropped) is one command, run with
`bash -o pipefail -c` in the walk's folder; so a block must keep no shell state from one line to the next
(no cd, export or bare assignment: checked). Commands quoted inline in the prose (the records of a
measurement, such as benchmarks/README.md's "Command C") are not run.

The walk's folder is a copy of the working tree's files as git lists them (tracked and new, not ignored),
with .venv a link to the interpreter's environment (requirements-test.txt, so nothing is installed);
nothing is written into the repository. Every command runs there with PATH starting with .venv/bin (the
README asks for the environment to be active), TMPDIR the walk's tmp/ (so mktemp and the benchmarks' work
folders stay inside), DATA_DIR and PYTHON unset, and MOVIELENS_URL a server on 127.0.0.1 holding small
fabricated ml-20m and ml-1m zips (MOVIELENS_MD5 is the checksum of the zip the command names, ml-20m unless
it names ml-1m), as tests/test_dataset_scripts.py does. Everything else the walk changes is in the tables
below, each entry with its reason: SETUP (files in place before the first command), SUBSTITUTIONS (text
replaced in a command before it runs), SKIPS (commands not run), NEEDS_CUDA, FIGURES and OUTPUTS; and a
command of benchmarks/README.md that README.md holds word for word is run once, in README.md's place.
`python tests/test_readme_walk.py` prints the plan: every command and what the walk does with it.
"""
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

READMES = ("README.md", "benchmarks/README.md")
RUN_LANGUAGES = {"bash", "sh", "shell", "console"}
COMMAND_TIMEOUT_S = 300


@dataclass(frozen=True)
class Sub:
    """Replace `old` by `new` in every command (of `files`) that holds it; {walk} is the walk's folder."""
    old: str
    new: str
    why: str
    files: tuple = READMES


@dataclass(frozen=True)
class Skip:
    """Do not run the commands holding `match`, or every command of the section whose heading is `match`."""
    match: str
    why: str
    files: tuple = READMES


@dataclass(frozen=True)
class Figure:
    """The figure the README quotes (`quoted`, a regex with one group, in `file`) is the one the command
    holding `command` prints (`printed`, in its output, or in `output_file` of the walk's folder)."""
    command: str
    printed: str
    quoted: str
    file: str = "README.md"
    output_file: str | None = None


# The synthetic dataset of prepare_dataset.sh at 400 users x 300 items (synthetic.py's default, 6,000 x 3,000,
# trains 15-30 s an epoch on 2 CPUs, and the walk trains about 40 times).
TINY_SYNTHETIC = {"users": 400, "items": 300, "interactions_per_user_mean": 30}
SYNTHETIC_RATINGS = "data/synthetic/ratings.csv"
SETUP = {
    SYNTHETIC_RATINGS: "the synthetic data at 400 x 300 (default 6,000 x 3,000): an epoch takes a "
                                  "second, not 15-30 s; prepare_dataset.sh synthetic uses a ratings.csv that exists "
                                  "(and says so), as after an earlier run",
}

SUBSTITUTIONS = (
    Sub("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -r requirements.txt && ", "",
        "the walk's .venv is the test environment, which has requirements.txt (and more): no network, no new venv",
        ("README.md",)),
    Sub("DATA_DIR=/data ", "DATA_DIR={walk}/root/data ",
        "/data is a machine's data disk (the Docker image's DATA_DIR): the walk writes only inside its folder",
        ("README.md",)),
    Sub("ml-1m /data ", "ml-1m {walk}/root/data ", "as above", ("README.md",)),
    Sub("--trials 30 --epochs 12", "--trials 3 --epochs 2",
        "30 trials of 12 epochs take an hour; 3 of 2 run a search, its confirmation runs and its report",
        ("README.md",)),
    Sub("--trials 40 --epochs 30", "--trials 2 --epochs 1 --confirm_top 0",
        "the realistic preset's search took hours; the confirmation runs are walked in the search above",
        ("README.md",)),
    Sub("--seeds 5", "--seeds 2 --jobs 2", "5 seeds are 5 trainings; 2 still give a spread to report, and 2 at a "
        "time share the wait for torch to load"),
    Sub("-e 30 --patience 5", "-e 1 --patience 5", "30 epochs of the realistic preset per seed: minutes",
        ("README.md",)),
    Sub("-b 16384 -e 30 --patience 3", "-b 16384 -e 4 --patience 3", "fewer epochs", ("README.md",)),
    Sub(" -e 20", " -e 3", "the pretraining runs: fewer epochs", ("README.md",)),
    Sub("-e 6 -b 16384 --factors 16", "-e 2 -b 16384 --factors 16", "fewer epochs per seed", ("README.md",)),
    Sub("--device cpu --batch_sizes 1 1024 65536",
        "--device cpu --batch_sizes 1 1024 4096 --users 2000 --items 500 --iterations 3 --warmup 1",
        "the untrained model of ml-20m's shape is 31.8M parameters to build and export to ONNX, and 23 batches of "
        "65,536 per backend take seconds: the same code at 2,000 x 500, fewer and smaller batches"),
    Sub(" --iterations 100 --warmup 5", "", "timing only: the substitution above sets 3 iterations", ("README.md",)),
    Sub("--batch_size 65536 1048576 --precision fp32 amp",
        "--batch_size 4096 --precision fp32 amp --users 2000 --items 500 --positives 20000 --eval_users 200 "
        "--steps 2 --warmup 1 --no_floor",
        "ml-20m shapes take minutes and 5 GB per configuration (and the floor measures the machine for seconds)"),
    Sub("python benchmarks/convert_benchmark.py", "python benchmarks/convert_benchmark.py --preset default",
        "an ml-20m-sized file is 20M rows to generate and convert", ("README.md",)),
    Sub("--users_timed 2000", "--users_timed 20 --users 2000 --items 500 --positives 40000",
        "ml-20m's shape and 2,000 users took 170-400 s per configuration"),
)

SKIPS = (
    Skip("-m pytest", "the test suite itself, this walk's fast checks among it: CI runs it", ("README.md",)),
    Skip("bash .ci/run", "CI itself: installs packages from PyPI and runs every test, this walk included",
         ("README.md",)),
    Skip("torchrun --standalone --nproc_per_node=8", "8 processes, one per GPU of a DGX, on ml-20m; "
         "tests/test_distributed.py runs torchrun with 2 processes on gloo", ("README.md",)),
    Skip("### Many processes, many machines", "8 processes per machine (GPUs) and two machines with real host "
         "names; tests/test_distributed.py runs torchrun, torch.distributed.launch and a 2-node launch on gloo",
         ("README.md",)),
    Skip("### Docker", "needs a Docker engine and NVIDIA GPUs (docker run --gpus all)", ("README.md",)),
    Skip("pip install -r requirements-", "installs from PyPI (network); the walk's environment has "
         "requirements-test.txt, which includes the export and tune extras", ("README.md",)),
    Skip("createdb ", "a PostgreSQL server at db-host; tests/test_tune_postgres.py runs two workers on a server "
         "it starts", ("README.md",)),
    Skip("--storage postgresql://", "as above", ("README.md",)),
    Skip("python tune.py ... --seed 2 ...", "elided: the command above, on a second machine", ("README.md",)),
    Skip("DEVICE=cpu OUT=/tmp/cpu benchmarks/gpu_check.sh", "tests/test_benchmarks.py::"
         "test_gpu_check_script_cpu_path runs this command, with OUT in its own folder (1-2 minutes)",
         ("benchmarks/README.md",)),
)

# Without CUDA these must end in one stderr line naming CUDA, exit status 2 (bad input), before any work.
# With CUDA they are skipped: ml-20m sizes take minutes; benchmarks/gpu_check.sh runs them on a GPU machine.
NEEDS_CUDA = ("--device cuda", "OUT=/tmp/gpu benchmarks/gpu_check.sh")

FIGURES = (
    Figure("benchmarks/planted_ceiling.py --cache runs/realistic/cache", r"planted model, test: HR@10 (\d\.\d{4})",
           r"The model that generated the data reaches (\d\.\d{4})"),
    Figure("benchmarks/planted_ceiling.py --cache runs/realistic/cache", r"planted model, valid: HR@10 (\d\.\d{4})",
           r"\| the planted model \(the ceiling\) \| - \| (\d\.\d{4}) \|"),
    Figure("--output runs/realistic/defaults", r"item-popularity baseline: HR@10 (\d\.\d{4})",
           r"item popularity reaches HR@10 (\d\.\d{4})", output_file="runs/realistic/defaults/seed_1.out"),
)
# Figures the text quotes that the walk does not check, since their command takes minutes at its documented
# size: the quick start's (5 epochs of 6,000 users: 2-3 minutes) and the full-ranking ones made from it, the
# training stability spread (5 seeds x 6 epochs), the realistic preset's search (hours), and every speed.

# (command holding, text its output holds, why)
OUTPUTS = (
    ("./verify_dataset.sh ml-1m data/ml-1m.zip", "PASSED", "the comment says it prints PASSED"),
    ("./download_dataset.sh ml-1m data", "skipping download", "the Data section: a verified download is kept"),
)


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    section: str
    text: str  # as written, continuation lines joined

    def __str__(self):
        return f"{self.file}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Block:
    file: str
    line: int
    section: str
    language: str
    commands: tuple

    @property
    def name(self):
        return f"{self.file}:{self.line} {self.section.lstrip('# ')}"


def read_blocks(file):
    """The fenced blocks of `file` in order, with the heading each is under; a shell block's commands."""
    lines = (ROOT / file).read_text().splitlines()
    blocks, section, n = [], "", 0
    while n < len(lines):
        line = lines[n]
        if line.startswith("#"):
            section = line
        fence = re.match(r"^```(\S*)\s*$", line)
        if not fence:
            n += 1
            continue
        end = next(i for i in range(n + 1, len(lines)) if lines[i].startswith("```"))
        language = fence.group(1)
        body = lines[n + 1 : end]
        commands = tuple(block_commands(file, n + 2, section, language, body)) if language in RUN_LANGUAGES else ()
        blocks.append(Block(file, n + 1, section, language, commands))
        n = end + 1
    return blocks


def block_commands(file, first_line, section, language, body):
    text, start = "", None
    for number, raw in enumerate(body, first_line):
        line = raw
        if language == "console" and not text:
            if not raw.startswith("$ "):
                continue  # output shown in the block
            line = raw[2:]
        if not text and (not line.strip() or line.lstrip().startswith("#")):
            continue
        start = start or number
        line = line.strip() if text else line.rstrip()
        if line.endswith("\\"):
            text += line[:-1].rstrip() + " "
            continue
        text += line
        yield Command(file, start, section, text)
        text, start = "", None
    assert not text, f"{file}: a block ends in a continuation line: {text}"


def all_blocks():
    return [block for file in READMES for block in read_blocks(file)]


def shell_blocks():
    return [block for block in all_blocks() if block.commands]


def skip_of(command):
    for skip in SKIPS:
        if command.file in skip.files and (skip.match == command.section or skip.match in command.text):
            return skip
    return None


def without_comment(text):
    return re.sub(r"\s+#.*$", "", text)


@functools.cache
def readme_commands():
    return {without_comment(c.text): c for b in read_blocks("README.md") for c in b.commands}


def duplicate_of(command):
    """The README.md command that a benchmarks/README.md command repeats word for word (run once, there)."""
    return readme_commands().get(without_comment(command.text)) if command.file != "README.md" else None


def needs_cuda(command):
    return any(match in command.text for match in NEEDS_CUDA)


def substituted(command):
    """The command as the walk runs it, and the substitutions made."""
    text, made = command.text, []
    for sub in SUBSTITUTIONS:
        if command.file in sub.files and sub.old in text:
            text = text.replace(sub.old, sub.new)
            made.append(sub)
    return text, made


def plan(command, cuda):
    """(what the walk does: 'run', 'skip' or 'refuse without CUDA', the reason or substitutions)."""
    skip = skip_of(command)
    if skip:
        return "skip", skip.why
    if duplicate_of(command):
        return "skip", f"README.md:{duplicate_of(command).line} is the same command, and the walk runs it there"
    if needs_cuda(command):
        return ("skip", "needs CUDA, and at these sizes takes minutes: benchmarks/gpu_check.sh runs it") if cuda \
            else ("refuse without CUDA", "one line naming CUDA, exit status 2")
    made = substituted(command)[1]
    return "run", "; ".join(f"{sub.old!r} -> {sub.new!r} ({sub.why})" for sub in made)


# -- the fabricated downloads ---------------------------------------------------------------------------------


def fabricated_zips(folder):
    """ml-20m.zip and ml-1m.zip laid out as GroupLens's, small: {name: md5}."""
    rows = [(user, (user * 7 + k * 5) % 200 + 1, k % 5 + 1, 1_000_000 + 100 * user + k)
            for user in range(1, 61) for k in range(30)]
    files = {"ml-20m": ("ml-20m/ratings.csv", "userId,movieId,rating,timestamp\n" +
                        "".join(f"{u},{i},{r}.0,{t}\n" for u, i, r, t in rows)),
             "ml-1m": ("ml-1m/ratings.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))}
    md5 = {}
    for name, (member, content) in files.items():
        path = folder / f"{name}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, content)
        md5[name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Walk:
    """The walk's folder, server and environment, and the blocks run so far."""

    def __init__(self, folder):
        import synthetic

        self.root = folder / "walk"
        copy_working_tree(self.root)
        (self.root / ".venv").symlink_to(Path(sys.prefix))
        (self.root / "tmp").mkdir()
        synthetic.write_ratings_csv(self.root / SYNTHETIC_RATINGS, **TINY_SYNTHETIC)
        served = folder / "served"
        served.mkdir()
        self.md5 = fabricated_zips(served)
        handler = functools.partial(QuietHandler, directory=str(served))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "PYTHON", "MOVIELENS_MD5")}
        env.update(PATH=f"{self.root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                   TMPDIR=str(self.root / "tmp"), OMP_WAIT_POLICY="PASSIVE",
                   MOVIELENS_URL=f"http://127.0.0.1:{self.server.server_address[1]}")
        self.env = env
        self.done, self.failed, self.seconds = set(), {}, {}
        import torch

        self.cuda = torch.cuda.is_available()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def run_block(self, block):
        """Run the block's commands in order; (failures, skipped commands with reasons)."""
        self.done.add(block.name)
        failures, skipped = [], []
        for command in block.commands:
            action, why = plan(command, self.cuda)
            if action == "skip":
                skipped.append(f"{command.file}:{command.line}: {why}")
                continue
            problem = self.run_command(command, action)
            if problem:
                failures.append(f"{command}\n{problem}")
                break  # as a newcomer would stop
        if failures:
            self.failed[block.name] = failures
        return failures, skipped

    def run_command(self, command, action):
        text = substituted(command)[0].replace("{walk}", str(self.root))
        env = {**self.env, "MOVIELENS_MD5": self.md5["ml-1m" if "ml-1m" in text else "ml-20m"]}
        start = time.monotonic()
        try:
            result = subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=self.root, env=env, text=True,
                                    capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return f"ran past {COMMAND_TIMEOUT_S} s"
        finally:
            self.seconds[str(command)] = time.monotonic() - start
        output = result.stdout + result.stderr
        shown = f"exit status {result.returncode}; output ends:\n{output[-3000:]}"
        if action == "refuse without CUDA":
            lines = result.stderr.strip().splitlines()
            if result.returncode != 2 or len(lines) != 1 or "CUDA" not in lines[0] or "Traceback" in output:
                return f"without CUDA it must end in one stderr line naming CUDA, exit status 2: {shown}"
            return None
        if result.returncode != 0:
            return shown
        return self.check_output(command, output)

    def check_output(self, command, output):
        for figure in FIGURES:
            if figure.command not in command.text:
                continue
            source = (self.root / figure.output_file).read_text() if figure.output_file else output
            printed = re.search(figure.printed, source)
            quoted = re.search(figure.quoted, (ROOT / figure.file).read_text())
            if not printed:
                return f"prints no figure like {figure.printed!r}:\n{source[-2000:]}"
            if printed.group(1) != quoted.group(1):  # seeded data and exact arithmetic: the same 4 digits
                return f"prints {printed.group(0)!r}, but {figure.file} quotes {quoted.group(1)}"
        for holding, expected, why in OUTPUTS:
            if holding in command.text and expected not in output:
                return f"does not print {expected!r} ({why}):\n{output[-2000:]}"
        return None


def copy_working_tree(destination):
    """The files a clone of the working tree would have: tracked ones (as edited) and new ones git does not
    ignore, with their modes."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not there
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


# -- the fast checks: the tables name what the READMEs hold ------------------------------------------------------


def test_every_fence_has_a_language_and_no_block_keeps_shell_state():
    for block in all_blocks():
        assert block.language, f"{block.name}: a fence without a language: ```bash to be run, ```text not to"
        for command in block.commands:
            assert not re.match(r"^(cd|export|source|\.)\s|^\w+=\S*\s*(#.*)?$", command.text), (
                f"{command}: the walk runs each line in its own shell, so a block keeps no state from line to "
                "line: write the value into the commands that use it")


def test_every_table_entry_holds_for_the_readmes():
    """A README edit that leaves an entry matching nothing (or a quoted figure gone) fails here, at once."""
    commands = [command for block in shell_blocks() for command in block.commands]
    runs = [c for c in commands if not skip_of(c) and not needs_cuda(c) and not duplicate_of(c)]
    for sub in SUBSTITUTIONS:
        assert any(sub in substituted(c)[1] for c in runs), \
            f"no command that runs holds {sub.old!r}: remove the substitution or fix it"
    for skip in SKIPS:
        assert any(skip_of(c) == skip for c in commands), f"no command matches the skip {skip.match!r}"
    for match in NEEDS_CUDA:
        assert any(match in c.text and not skip_of(c) for c in commands), f"no command holds {match!r}"
    for figure in FIGURES:
        assert [c for c in runs if figure.command in c.text], f"no command that runs holds {figure.command!r}"
        assert re.search(figure.quoted, (ROOT / figure.file).read_text()), \
            f"{figure.file} no longer quotes {figure.quoted!r}: fix the table"
    for holding, _, _ in OUTPUTS:
        assert any(holding in c.text for c in runs), f"no command that runs holds {holding!r}"


# -- the walk ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    walk = Walk(tmp_path_factory.mktemp("readme-walk"))
    yield walk
    walk.close()
    if walk.seconds:
        total = sum(walk.seconds.values())
        slowest = sorted(walk.seconds.items(), key=lambda item: -item[1])[:5]
        print(f"\nREADME walk: {len(walk.seconds)} commands in {total:.0f} s; slowest: " +
              "; ".join(f"{seconds:.0f} s {name[:100]}" for name, seconds in slowest))


BLOCKS = shell_blocks()


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_readme_block_runs_as_written(walk, block):
    for earlier in BLOCKS[: BLOCKS.index(block)]:  # what a -k selection left out, in order
        if earlier.name not in walk.done:
            walk.run_block(earlier)
    failures, skipped = walk.run_block(block)
    before = [name for name in walk.failed if name != block.name]
    assert not failures, "\n".join(failures) + (f"\n(earlier blocks failed too: {before})" if before else "")
    if len(skipped) == len(block.commands):
        pytest.skip("; ".join(skipped))


@pytest.mark.slow
@pytest.mark.parametrize("args", [["benchmarks/sync_check.py", "--data", "data/cache/synthetic"],
                                  ["benchmarks/sync_check.py", "--data", "no-such-cache", "--device", "cuda"]],
                         ids=["sync_check default device", "sync_check cuda"])
def test_without_cuda_the_cuda_checks_refuse_in_one_line(tmp_path, args):
    """sync_check.py, which no README block runs alone (gpu_check.sh does): its default --device cuda on a
    machine without CUDA is one line, exit status 2, before it reads the data."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    result = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    (line,) = result.stderr.strip().splitlines()
    assert "CUDA" in line and "--device cpu" in line


def print_plan():
    import torch

    cuda = torch.cuda.is_available()
    print(f"setup: {SETUP}\n")
    for block in shell_blocks():
        print(f"== {block.name}")
        for command in block.commands:
            action, why = plan(command, cuda)
            print(f"  {action:<20} {command.text}" + (f"\n  {'':<20} {why}" if why else ""))


if __name__ == "__main__":
    print_plan()
