"""Recommendations, export for serving, and the inference benchmark: one command line, three modules.

Recommend (original ids in and out), from an export or a checkpoint; for every user into a file:
    python inference.py recommend --model data/export/ml-20m --users 12 345 --json
    python inference.py recommend --data data/cache/ml-20m --checkpoint data/checkpoints/model.pth --users 12 345
    python inference.py recommend --model data/export/ml-20m --all_users --output recs.parquet
Export the scoring model, the id maps and a manifest (`--format onnx` needs requirements-export.txt):
    python inference.py export --checkpoint data/checkpoints/model.pth --data data/cache/ml-20m \
        --format onnx --output data/export/ml-20m
Benchmark inference (no data needed: the default model on ml-20m's shape):
    python inference.py benchmark --backend torch onnxruntime --precision fp32 --device cpu --batch_sizes 1 1024

`python inference.py COMMAND --help` gives each command's flags. The commands live in serving.py,
export.py and benchmarks/inference_benchmark.py; this file imports only the one asked for, so that
`recommend --model` on an ONNX export loads neither torch nor the training code (a serving machine needs
numpy, tqdm and onnxruntime). The name is the recipe's: NVIDIA's inference.py is its inference benchmark.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before anything starts a thread pool)

import importlib
import os
import sys

from cli import main_guard

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
# command -> (module, what it does)
COMMANDS = {"recommend": ("serving", "top-K unseen items of some or all users, printed or written to a file"),
            "export": ("export", "scoring model, id maps and manifest for serving"),
            "benchmark": ("inference_benchmark", "inference samples/s and latency (benchmarks/inference_benchmark.py)")}


def parse_args(argv):
    """Only reached without a known command: --help lists the commands, anything else is a one-line error."""
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, what) in COMMANDS.items():
        commands.add_parser(name, help=what, add_help=False)
    return parser.parse_args(argv)


def command_module(command):
    if command == "benchmark" and BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)  # the folder is no package; its scripts import each other so too
    return importlib.import_module(COMMANDS[command][0])


@main_guard
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return command_module(argv[0]).main(argv[1:], prog=f"inference.py {argv[0]}")
    parse_args(argv)
    return None


if __name__ == "__main__":
    main()
