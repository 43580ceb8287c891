"""Convert time and peak memory on an ml-20m-shaped ratings file.

    python benchmarks/convert_benchmark.py                    # 138,493 users, 26,744 items, ~20M rows
    python benchmarks/convert_benchmark.py --preset ml-1m     # quicker look

Generates the synthetic ratings.csv once (not timed; kept in --workdir for reruns), then runs
convert.py in a subprocess so the wall time includes interpreter start and imports, and the peak
RSS (the child's own rusage, from os.wait4) is the converter's alone. Prints one JSON line and a short table.

What it keeps and removes is only its own: ratings.csv is reused only if the ratings.json written beside it
(created_by this script) records its size and SHA-256, and the timed cache is removed afterwards only if
metadata.json says convert.py wrote it and nothing else is in its folder. Both paths are checked before
any work.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cache_format import CACHE_FILES, file_record, is_replaceable, read_metadata  # noqa: E402
from cli import (  # noqa: E402
    ArgumentParser,
    EnvironmentFailure,
    UserError,
    check_output_path,
    json_marker,
    main_guard,
    owned_file,
    proven,
    remove_owned_folder,
)

PRESETS = ("ml-20m", "ml-1m", "default")  # synthetic.py's --preset choices
CREATED_BY = "benchmarks/convert_benchmark.py"
# What cli.py would set inside convert.py anyway; stated here so the benchmark can print it.
CHILD_ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="ml-20m")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ncf-convert-benchmark"),
                        help="where the generated ratings.csv is kept between runs")
    parser.add_argument("--negatives", type=int, default=100)
    return parser.parse_args(argv)


def marker_of(ratings):
    return os.path.splitext(ratings)[0] + ".json"


def is_our_ratings(ratings, preset):
    """ratings.csv is the file this script generated for `preset`: its marker records its size and SHA-256."""
    marker = marker_of(ratings)
    if not proven(json_marker(CREATED_BY), marker):
        return False
    with open(marker, encoding="utf-8") as f:
        record = json.load(f)
    return record.get("preset") == preset and record.get("file") == file_record(ratings)


def check_paths(args, ratings, output):
    """Before any work: a --workdir that can hold the files, a ratings.csv that is ours or absent, and a cache
    folder that is absent or convert.py's (which convert.py may replace and this script removes)."""
    if args.negatives < 1:
        raise UserError(f"--negatives must be at least 1, got {args.negatives}")
    check_output_path(args.workdir, "--workdir", folder=True)
    check_output_path(ratings, "--workdir")
    if os.path.lexists(ratings) and not is_our_ratings(ratings, args.preset):
        raise UserError(f"--workdir: {ratings} exists and is not the ratings.csv this script generated for "
                        f"--preset {args.preset} (no {os.path.basename(marker_of(ratings))} of ours records it), so "
                        "it is neither used nor replaced: move it away or choose another --workdir")
    check_output_path(output, "--workdir", folder=True)
    if os.path.isdir(output) and not is_replaceable(output):
        raise UserError(f"--workdir: {output} exists and is not a cache convert.py wrote (it holds other files), so "
                        "it is neither replaced nor removed: move it away or choose another --workdir")


def ensure_ratings(path, preset):
    if os.path.exists(path):
        print(f"reusing {path}", file=sys.stderr)
        return
    start = time.perf_counter()
    # Generation also runs as a child, so it must not count towards convert's peak RSS.
    child = subprocess.run([sys.executable, os.path.join(ROOT, "synthetic.py"), "--preset", preset, "--output", path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, encoding="utf-8")
    if child.returncode:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentFailure(f"generating {path} failed with exit status {child.returncode}: {last}")
    with owned_file(marker_of(path), "--workdir", json_marker(CREATED_BY), "a ratings record") as f:
        f.write(json.dumps({"created_by": CREATED_BY, "preset": preset, "file": file_record(path)}).encode())
    print(f"generated {path} in {time.perf_counter() - start:.1f} s (not timed)", file=sys.stderr)


def count_rows(path):
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


def run_convert(ratings, output, negatives):
    command = [sys.executable, os.path.join(ROOT, "convert.py"), "--path", ratings, "--output", output,
               "--negatives", str(negatives), "--no_progress"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=CHILD_ENV)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would also count the generator's peak.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        last = (errors.read().strip().splitlines() or ["no output"])[-1]
    if child.returncode:
        raise EnvironmentFailure(f"convert failed with exit status {child.returncode} ({last}): {' '.join(command)}")
    peak_kib = usage.ru_maxrss  # KiB on Linux
    return wall, peak_kib * 1024, command


def remove_cache(output):
    """The timed cache goes, but only if it is convert.py's and nothing else is in it."""
    if not remove_owned_folder(output, CACHE_FILES, lambda path: is_replaceable(os.path.dirname(path))):
        print(f"left {output}: it holds files convert.py did not write", file=sys.stderr)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    ratings = os.path.join(args.workdir, args.preset, "ratings.csv")
    output = os.path.join(args.workdir, args.preset, "cache")
    check_paths(args, ratings, output)
    ensure_ratings(ratings, args.preset)
    wall, peak_bytes, command = run_convert(ratings, output, args.negatives)
    metadata = read_metadata(output)
    remove_cache(output)
    result = {
        "benchmark": "convert",
        "preset": args.preset,
        "rows_in_file": count_rows(ratings),
        "num_users": metadata["num_users"],
        "num_items": metadata["num_items"],
        "num_train": metadata["num_train"],
        "negatives": args.negatives,
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(peak_bytes / 2**30, 2),
        "cpus": os.cpu_count(),
        "omp_wait_policy": CHILD_ENV["OMP_WAIT_POLICY"],
        "command": " ".join(command),
    }
    print(json.dumps(result))
    print(f"{'dataset':<10} {'rows':>12} {'wall (s)':>9} {'peak RSS (GiB)':>15}")
    print(f"{args.preset:<10} {result['rows_in_file']:>12,} {result['wall_s']:>9.2f} {result['peak_rss_gib']:>15.2f}")


if __name__ == "__main__":
    main()
