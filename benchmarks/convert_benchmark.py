"""Convert time and peak memory on an ml-20m-shaped ratings file (SPEC §8).

    python benchmarks/convert_benchmark.py                    # 138,493 users, 26,744 items, ~20M rows
    python benchmarks/convert_benchmark.py --preset ml-1m     # quicker look

Generates the synthetic ratings.csv once (not timed; kept in --workdir for reruns), then runs
convert.py in a subprocess so the wall time includes interpreter start and imports, and the peak
RSS (the child's own rusage, from os.wait4) is the converter's alone. Prints one JSON line and a short table.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PRESETS = ("ml-20m", "ml-1m", "default")  # synthetic.py's --preset choices
# What cli.py would set inside convert.py anyway; stated here so the benchmark can print it.
CHILD_ENV = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="ml-20m")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ncf-convert-benchmark"),
                        help="where the generated ratings.csv is kept between runs")
    parser.add_argument("--negatives", type=int, default=100)
    return parser.parse_args()


def ensure_ratings(path, preset):
    if os.path.exists(path):
        print(f"reusing {path}", file=sys.stderr)
        return
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "synthetic.py"), "--preset", preset,
                    "--output", path], check=True, stdout=subprocess.DEVNULL)
    # Generation also runs as a child, so it must not count towards convert's peak RSS.
    print(f"generated {path} in {time.perf_counter() - start:.1f} s (not timed)", file=sys.stderr)


def count_rows(path):
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


def run_convert(ratings, output, negatives):
    command = [sys.executable, os.path.join(ROOT, "convert.py"), "--path", ratings, "--output", output,
               "--negatives", str(negatives), "--no_progress"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=CHILD_ENV)
    # wait4 gives this child's own rusage; RUSAGE_CHILDREN would also count the generator's peak.
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"convert failed with exit status {child.returncode}: {' '.join(command)}")
    peak_kib = usage.ru_maxrss  # KiB on Linux
    return wall, peak_kib * 1024, command


def main():
    args = parse_args()
    ratings = os.path.join(args.workdir, args.preset, "ratings.csv")
    ensure_ratings(ratings, args.preset)
    output = os.path.join(args.workdir, args.preset, "cache")
    wall, peak_bytes, command = run_convert(ratings, output, args.negatives)
    with open(os.path.join(output, "metadata.json")) as f:
        metadata = json.load(f)
    shutil.rmtree(output)
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
