"""python -m logger.plot: a PNG from hand-written JSON-lines logs, overlaying runs."""
import json
import sys

import pytest

from cli import UserError
from logger import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(path, precision, epochs, full=False, hr0=0.4):
    lines = [{"event": "config", "args": {"topk": 10, "opt_level": "O0"}, "precision": precision,
              "popularity_hr": 0.3}]
    for e in range(1, epochs + 1):
        record = {"event": "epoch", "epoch": e, "loss": 0.5 / e, "hr": hr0 + 0.05 * e, "ndcg": 0.2 + 0.03 * e,
                  "train_time_s": 1.0, "train_throughput": 1e6 + e, "eval_time_s": 0.1, "eval_throughput": 5e6}
        if full:
            record.update(full_hr=0.1 + 0.01 * e, full_ndcg=0.05 + 0.01 * e)
        lines.append(record)
    lines.append({"event": "summary", "best_hr": hr0 + 0.05 * epochs, "best_epoch": epochs})
    with open(path, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def test_overlaid_runs_make_a_png(tmp_path, capsys):
    fp32 = write_log(tmp_path / "fp32.json", "fp32", 4, full=True)
    amp = write_log(tmp_path / "amp.json", "bf16 autocast", 3)
    output = tmp_path / "run.png"
    plot.main([str(fp32), str(amp), "-o", str(output), "--labels", "fp32", "AMP", "--title", "fp32 vs AMP"])
    data = output.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert capsys.readouterr().out.strip() == f"wrote {output}: 2 run(s), 7 epochs"


def test_runs_appended_to_one_log_are_split_and_labelled(tmp_path):
    log = write_log(tmp_path / "runs.json", "fp32", 3)
    write_log(log, "bf16 autocast", 2, hr0=0.5)
    curves = plot.label_runs([str(log)], None)
    assert [(label, [r["epoch"] for r in records]) for label, _, records in curves] == [
        ("runs (fp32) #1", [1, 2, 3]), ("runs (bf16 autocast) #2", [1, 2])]
    # A resumed run carries on counting epochs: one curve.
    resumed = write_log(tmp_path / "resumed.json", "fp32", 2)
    with open(resumed, "a") as f:
        f.write(json.dumps({"event": "config", "precision": "fp32", "args": {"topk": 10}}) + "\n")
        f.write(json.dumps({"event": "epoch", "epoch": 3, "loss": 0.1, "hr": 0.6, "ndcg": 0.3}) + "\n")
    ((label, _, records),) = plot.label_runs([str(resumed)], None)
    assert label == "resumed (fp32)" and [r["epoch"] for r in records] == [1, 2, 3]


@pytest.mark.slow
def test_a_missing_log_is_one_line_from_the_command_line(tmp_path, run_cli, assert_user_error):
    assert_user_error(run_cli([sys.executable, "-m", "logger.plot", str(tmp_path / "missing.json")]),
                      "missing.json", "--log_path")


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--log_path"):
        plot.label_runs([str(tmp_path / "missing.json")], None)
    test_only = tmp_path / "test.json"
    test_only.write_text(json.dumps({"event": "test", "hr": 0.5}) + "\n")
    with pytest.raises(UserError, match="no epoch records"):
        plot.label_runs([str(test_only)], None)
    (tmp_path / "bad.json").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        plot.label_runs([str(tmp_path / "bad.json")], None)
    log = write_log(tmp_path / "a.json", "fp32", 2)
    with pytest.raises(UserError, match="--labels"):
        plot.label_runs([str(log)], ["one", "two"])


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    log = write_log(tmp_path / "a.json", "fp32", 2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot.plot(plot.label_runs([str(log)], None), tmp_path / "run.png")
    assert not (tmp_path / "run.png").exists()


def test_the_plotted_lines_are_the_logged_figures(tmp_path, monkeypatch):
    """Each panel's lines hold the epochs and the values of its key, per run, with the legend's labels."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure open to read it back
    fp32 = write_log(tmp_path / "fp32.json", "fp32", 4, full=True)
    amp = write_log(tmp_path / "amp.json", "bf16 autocast", 3, hr0=0.5)
    curves = plot.label_runs([str(fp32), str(amp)], ["fp32", "AMP"])
    plot.plot(curves, str(tmp_path / "run.png"))
    (figure,) = figures
    try:
        panels = {ax.get_ylabel(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                    for line in ax.lines} for ax in figure.axes}
    finally:
        plt.close(figure)
    e4, e3 = [1, 2, 3, 4], [1, 2, 3]
    expected = {
        "loss": {"fp32": (e4, [0.5 / e for e in e4]), "AMP": (e3, [0.5 / e for e in e3])},
        "HR@10": {"fp32, sampled": (e4, [0.4 + 0.05 * e for e in e4]),
                  "fp32, full ranking": (e4, [0.1 + 0.01 * e for e in e4]),
                  "AMP, sampled": (e3, [0.5 + 0.05 * e for e in e3])},
        "NDCG@10": {"fp32, sampled": (e4, [0.2 + 0.03 * e for e in e4]),
                    "fp32, full ranking": (e4, [0.05 + 0.01 * e for e in e4]),
                    "AMP, sampled": (e3, [0.2 + 0.03 * e for e in e3])},
        "MRR@10": {},  # logs written before MRR: an empty panel
        "throughput (samples/s)": {"fp32, train": (e4, [1e6 + e for e in e4]), "fp32, eval": (e4, [5e6] * 4),
                                   "AMP, train": (e3, [1e6 + e for e in e3]), "AMP, eval": (e3, [5e6] * 3)},
    }
    assert panels.keys() == expected.keys()
    for ylabel, lines in expected.items():
        assert panels[ylabel].keys() == lines.keys(), ylabel
        for label, (x, y) in lines.items():
            assert panels[ylabel][label][0] == x, (ylabel, label)
            assert panels[ylabel][label][1] == pytest.approx(y, rel=1e-12), (ylabel, label)
    # A run keeps one colour in every panel, and the two runs' colours differ.
    colours = {}
    for ax in figure.axes:
        for line in ax.lines:
            colours.setdefault(line.get_label().split(",")[0], set()).add(line.get_color())
    assert len(colours["fp32"]) == len(colours["AMP"]) == 1 and colours["fp32"] != colours["AMP"]
