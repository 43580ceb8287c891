"""Plot runs from their JSON-lines logs (`ncf.py --log_path`): loss, HR@k, NDCG@k and throughput per epoch.

    python -m logger.plot runs/fp32.json runs/amp.json -o runs/accuracy.png
    python -m logger.plot runs/fp32.json runs/amp.json --labels fp32 AMP -o runs/accuracy.png

Several logs are overlaid (e.g. fp32 against AMP, as the recipe's accuracy-curve figure does). A log
that holds several runs appended one after another (the epoch count starts again) is split into
them; a resumed run, whose epochs carry on, stays one curve. Needs matplotlib (optional dependency).
"""
import argparse
import json
import os

from cli import UserError, main_guard

# Per panel: y-axis label and its series (JSON key, legend suffix, line style). Keys are those of
# logger/__init__.py's epoch records.
PANELS = (
    ("loss", (("loss", "train loss", "-"),)),
    ("HR@{k}", (("hr", "sampled", "-"), ("full_hr", "full ranking", "--"))),
    ("NDCG@{k}", (("ndcg", "sampled", "-"), ("full_ndcg", "full ranking", "--"))),
    ("throughput (samples/s)", (("train_throughput", "train", "-"), ("eval_throughput", "eval", "--"))),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m logger.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="JSON-lines logs written by ncf.py --log_path")
    parser.add_argument("-o", "--output", default="run.png", help="PNG file to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per log (default: file name and precision)")
    parser.add_argument("--title", default=None, help="figure title")
    return parser.parse_args(argv)


def read_runs(path):
    """[(precision, topk, [epoch records])] of the runs in one log."""
    if not os.path.isfile(path):
        raise UserError(f"log {path} does not exist: pass the --log_path of an ncf.py training run")
    runs, config = [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {number} is not JSON: pass a log written by ncf.py --log_path") from None
            if record.get("event") == "config":
                config = record
            elif record.get("event") == "epoch":
                if not runs or record["epoch"] <= runs[-1][2][-1]["epoch"]:
                    runs.append((config.get("precision"), config.get("args", {}).get("topk", 10), []))
                runs[-1][2].append(record)
    if not runs:
        raise UserError(f"{path} has no epoch records: pass the --log_path of an ncf.py training run "
                        f"(--mode test logs have none)")
    return runs


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
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (ylabel, series) in zip(axes.flat, PANELS, strict=True):
        for n, (label, _, records) in enumerate(curves):
            for key, kind, style in series:
                points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    name = label if len(series) == 1 else f"{label}, {kind}"
                    ax.plot(x, y, style, marker="o", markersize=3, color=colors[n % len(colors)], label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel.format(k=k))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    try:
        fig.savefig(output, dpi=110)
    except OSError as err:
        raise UserError(f"cannot write {output} ({err.strerror}): choose a writable -o/--output") from None
    finally:
        plt.close(fig)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    curves = label_runs(args.logs, args.labels)
    plot(curves, args.output, args.title)
    print(f"wrote {args.output}: {len(curves)} run(s), "
          f"{sum(len(records) for _, _, records in curves)} epochs")


if __name__ == "__main__":
    main()
