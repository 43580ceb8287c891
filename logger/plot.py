"""Plot runs from their JSON-lines logs (`ncf.py --log_path`): loss, HR@k, NDCG@k and throughput per epoch.

    python -m logger.plot runs/fp32.json runs/amp.json -o runs/accuracy.png
    python -m logger.plot runs/fp32.json runs/amp.json --labels fp32 AMP -o runs/accuracy.png

Several logs are overlaid (e.g. fp32 against AMP, as the recipe's accuracy-curve figure does), each run
with its colour and its marker, so that runs with identical figures stay visible one over the other (the
legend and a printed note say which); the title names the runs unless --title gives one. A log that
holds several runs appended one after another (the epoch count starts again) is split into them; a
resumed run, whose epochs carry on, stays one curve. Needs matplotlib (optional dependency).

-o names the file written, and the path printed is that file: an existing folder gets FOLDER/run.png,
a name without a suffix gets .png (matplotlib's own rule, now said). It must be .png, .pdf or .svg;
it is checked before any work, and an existing file there is replaced only if it is a plot this command
wrote (its image metadata says so: never a log, nor a picture of the user's), written to a temporary
name then renamed. A log line that is
not a JSON object of the kind ncf.py writes (a truncated line, a number where an object goes, a
string where a figure goes) is a one-line error naming the file and line.
"""
import json
import math
import os

from cli import (
    ArgumentParser,
    EnvironmentFailure,
    UserError,
    check_may_write,
    check_output_path,
    holds,
    main_guard,
    owned_file,
)
from logger import METRIC_LABELS, record_problem

# Suffix -> (matplotlib format, how a file of that format starts).
FORMATS = {".png": ("png", b"\x89PNG\r\n\x1a\n"), ".pdf": ("pdf", b"%PDF-"), ".svg": ("svg", b"<?xml")}
DEFAULT_NAME = "run.png"
CREATED_BY = "ncf logger.plot"  # written into the image's metadata ("Creator"): the proof that a plot is ours
MAX_IMAGE_BYTES = 64 * 2**20  # a plot is well under a MiB: a larger file is no plot of ours, and is not read

# Per panel: y-axis label and its series (JSON key, legend suffix, line style). Keys are those of
# logger/__init__.py's epoch records.
PANELS = (
    ("loss", (("loss", "train loss", "-"),)),
    *((label, ((name, "sampled", "-"), (f"full_{name}", "full ranking", "--")))
      for name, label in METRIC_LABELS.items()),
    ("throughput (samples/s)", (("train_throughput", "train", "-"), ("eval_throughput", "eval", "--"))),
)
# Each run's marker (hollow, with its colour; the line style tells the series apart). Runs whose figures
# are identical (one command run twice) are drawn one over the other: the shapes keep both visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python -m logger.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="JSON-lines logs written by ncf.py --log_path")
    parser.add_argument("-o", "--output", default=DEFAULT_NAME,
                        help=f"image to write (.png, .pdf or .svg); a folder gets FOLDER/{DEFAULT_NAME}")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: file name and precision)")
    parser.add_argument("--title", default=None, help="figure title (default: the runs' labels)")
    return parser.parse_args(argv)


def read_runs(path):
    """[(precision, topk, [epoch records])] of the runs in one log."""
    if os.path.isdir(path):
        raise UserError(f"log {path} is a folder, not a log: pass the --log_path file of an ncf.py training run, "
                        f"e.g. {os.path.join(path, 'log.json')}")
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"log {path} is not a regular file (a device or a pipe): pass the --log_path of an ncf.py "
                        "training run")
    if not os.path.isfile(path):
        raise UserError(f"log {path} does not exist: pass the --log_path of an ncf.py training run")
    fix = "pass a log written by ncf.py --log_path"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read log {path} ({reason}): {fix}") from None
    runs, config = [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path} line {number} is not JSON (cut short or edited?): {fix}") from None
        problem = record_problem(record) or _plot_problem(record)
        if problem:
            raise UserError(f"{path} line {number} {problem}: {fix}")
        if record["event"] == "config":
            config = record
        elif record["event"] == "epoch":
            if not runs or record["epoch"] <= runs[-1][2][-1]["epoch"]:
                runs.append((config.get("precision"), config.get("args", {}).get("topk", 10), []))
            runs[-1][2].append(record)
    if not runs:
        raise UserError(f"{path} has no epoch records: pass the --log_path of an ncf.py training run "
                        f"(--mode test logs have none)")
    drawn = {key for _, series in PANELS for key, _, _ in series}
    if not any(drawn & set(record) for _, _, records in runs for record in records):
        raise UserError(f"{path} has epoch records but no figure to draw in them (loss, HR, NDCG, throughput): "
                        f"{fix}")
    return runs


def _plot_problem(record):
    """What this plot needs beyond record_problem: an epoch number, and a config it can read."""
    if record["event"] == "epoch" and record.get("epoch") is None:
        return 'is an epoch record without "epoch"'
    if record["event"] == "config":
        args = record.get("args", {})
        if not isinstance(args, dict):
            return 'has "args" that is not an object'
        topk = args.get("topk", 10)
        if isinstance(topk, bool) or not isinstance(topk, int):
            return f'has "topk": {json.dumps(topk)[:40]}, not an integer'
        if not isinstance(record.get("precision", ""), str | None):
            return 'has "precision" that is not a string'
    return None


def resolve_output(output, logs):
    """The file that -o names, checked before any work (see the module docstring)."""
    if os.path.isdir(output) or output.endswith(os.sep):
        output = os.path.join(output, DEFAULT_NAME)
    elif not os.path.lexists(output) and not os.path.splitext(output)[1]:
        output += ".png"
    check_output_path(output, "-o/--output")
    suffix = os.path.splitext(output)[1].lower()
    if suffix not in FORMATS:
        raise UserError(f"-o/--output {output}: plots are written as .png, .pdf or .svg, not "
                        f"{suffix or 'a file without a suffix'}: choose a name with one of these suffixes")
    if any(holds(log, output) for log in logs):
        raise UserError(f"-o/--output {output} is one of the logs to plot: choose another name")
    check_may_write(output, "-o/--output", plot_of(CREATED_BY), f"a {suffix[1:]} image")
    return output


def plot_of(created_by):
    """A proof (cli.may_write): the file is an image whose metadata says `created_by` wrote it."""

    def proof(path):
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            return False
        with open(path, "rb") as f:
            data = f.read()
        starts = (signature for _, signature in FORMATS.values())
        return any(data.startswith(signature) for signature in starts) and created_by.encode() in data

    return proof


def save_figure(fig, path, flag, created_by=CREATED_BY):
    """Write `fig` to `path` (its suffix gives the format) with `created_by` in its metadata, through
    cli.owned_file: an existing file is replaced only if it is a plot that `created_by` wrote."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower(), FORMATS[".png"])[0]
    with owned_file(path, flag, plot_of(created_by), f"a {fmt} image") as f:
        fig.savefig(f, format=fmt, dpi=110, metadata={"Creator": created_by})


def label_runs(paths, labels):
    """[(label, topk, epoch records)] over all logs."""
    if labels and len(labels) != len(paths):
        raise UserError(f"--labels: {len(labels)} labels for {len(paths)} logs: give one label per log")
    curves = []
    for i, path in enumerate(paths):
        runs = read_runs(path)
        for j, (precision, topk, records) in enumerate(runs):
            label = labels[i] if labels else os.path.splitext(os.path.basename(path))[0] + \
                (f" ({precision})" if precision else "")
            curves.append((label + (f" #{j + 1}" if len(runs) > 1 else ""), topk, records))
    return curves


def is_figure(value):
    """A value to draw: NaN and infinity (what a diverged epoch logs) are left out, as matplotlib's axis
    limits cannot hold infinity."""
    return value is not None and math.isfinite(value)


def same_as(curves):
    """{index of a curve: label of the first earlier curve with the same loss and metrics every epoch} (the
    throughputs of two runs always differ, and do not hide each other)."""
    keys = [key for _, series in PANELS for key, _, _ in series if not key.endswith("throughput")]
    first, same = {}, {}
    for n, (label, _, records) in enumerate(curves):
        figures = json.dumps([[r["epoch"], *(r.get(key) for key in keys)] for r in records])
        same[n] = first.get(figures)
        first.setdefault(figures, label)
    return {n: label for n, label in same.items() if label is not None}


def default_title(curves):
    labels = [label for label, _, _ in curves]
    shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
    return f"ncf.py, per epoch: {shown}"


def left_out(curves):
    """How many logged figures of the panels are NaN or infinite."""
    keys = [key for _, series in PANELS for key, _, _ in series]
    return sum(r.get(key) is not None and not is_figure(r[key]) for _, _, records in curves for r in records
               for key in keys)


def plot(curves, output, title=None):
    try:
        import matplotlib

        matplotlib.use("Agg")  # writes a file; never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("matplotlib is not installed, and plots need it: pip install matplotlib") from None
    ks = {k for _, k, _ in curves}
    k = ks.pop() if len(ks) == 1 else "k"
    rows = (len(PANELS) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.75 * rows), constrained_layout=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    same = same_as(curves)
    for ax in axes.flat[len(PANELS):]:  # an odd number of panels leaves one
        fig.delaxes(ax)
    for ax, (ylabel, series) in zip(axes.flat, PANELS, strict=False):
        for n, (label, _, records) in enumerate(curves):
            for key, kind, style in series:
                points = [(r["epoch"], r[key]) for r in records if is_figure(r.get(key))]
                if points:
                    x, y = zip(*points, strict=True)
                    name = label if len(series) == 1 else f"{label}, {kind}"
                    name += f" (= {same[n]})" if n in same and not key.endswith("throughput") else ""
                    ax.plot(x, y, style, marker=MARKERS[n % len(MARKERS)], markersize=max(3, 7 - n % len(MARKERS)),
                            markerfacecolor="none", color=colors[n % len(colors)], label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel.format(k=k))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(title or default_title(curves))
    try:
        save_figure(fig, output, "-o/--output")
    except OSError as err:  # atomic_file has removed its temporary file
        raise EnvironmentFailure(f"cannot write {output} ({err.strerror or err}); nothing was left behind: "
                                 "free some space and rerun") from None
    except (ValueError, OverflowError) as err:  # e.g. a figure of 1e308, whose axis limits overflow
        raise UserError(f"cannot draw the logs' figures ({str(err)[:80]}): they hold values no axis can show "
                        "(edited logs?); nothing was written") from None
    finally:
        plt.close(fig)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    output = resolve_output(args.output, args.logs)
    curves = label_runs(args.logs, args.labels)
    plot(curves, output, args.title)
    print(f"wrote {output}: {len(curves)} run(s), "
          f"{sum(len(records) for _, _, records in curves)} epochs")
    if left_out(curves):
        print(f"note: {left_out(curves)} logged figure(s) are NaN or infinite (a diverged epoch?) and are not drawn")
    for n, earlier in same_as(curves).items():
        print(f"note: {curves[n][0]} has the same loss and metrics as {earlier} every epoch: its curves lie on "
              f"{earlier}'s, told apart by their markers")


if __name__ == "__main__":
    main()
