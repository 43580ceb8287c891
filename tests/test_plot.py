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


def drawn_figure(monkeypatch, draw):
    """The matplotlib figure `draw()` makes, kept open (plot code closes its figures) to be read back."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw()
    (figure,) = figures
    return figure


def test_the_title_names_the_runs_unless_given(tmp_path, monkeypatch):
    fp32 = write_log(tmp_path / "fp32.json", "fp32", 2)
    amp = write_log(tmp_path / "amp.json", "bf16 autocast", 2, hr0=0.5)
    curves = plot.label_runs([str(fp32), str(amp)], ["fp32", "AMP"])
    figure = drawn_figure(monkeypatch, lambda: plot.plot(curves, str(tmp_path / "a.png")))
    assert figure._suptitle.get_text() == "ncf.py, per epoch: fp32, AMP"
    figure = drawn_figure(monkeypatch, lambda: plot.plot(curves, str(tmp_path / "b.png"), "mine"))
    assert figure._suptitle.get_text() == "mine"


def test_identical_runs_stay_visible_and_are_named(tmp_path, monkeypatch, capsys):
    """The same command run twice logs the same loss and metrics: the second curve lies on the first, so
    each run has its own marker and the legend and a note say that they coincide."""
    first = write_log(tmp_path / "first.json", "fp32", 3)
    second = write_log(tmp_path / "second.json", "fp32", 3)
    other = write_log(tmp_path / "other.json", "fp32", 3, hr0=0.5)
    output = tmp_path / "run.png"
    figure = drawn_figure(monkeypatch, lambda: plot.main([str(first), str(second), str(other), "-o", str(output)]))
    hr = next(ax for ax in figure.axes if ax.get_ylabel() == "HR@10")
    lines = {line.get_label(): line for line in hr.lines}
    assert sorted(lines) == ["first (fp32), sampled", "other (fp32), sampled",
                             "second (fp32), sampled (= first (fp32))"]
    markers = {line.get_marker() for line in lines.values()}
    assert len(markers) == 3  # one shape per run, hollow, so that the one drawn over the other shows through
    assert all(line.get_markerfacecolor() == "none" for line in lines.values())
    assert list(lines["second (fp32), sampled (= first (fp32))"].get_ydata()) == \
        list(lines["first (fp32), sampled"].get_ydata())
    note = capsys.readouterr().out.splitlines()[-1]
    assert note.startswith("note: second (fp32) has the same loss and metrics as first (fp32)")


def test_tune_plots_name_the_objective_and_number_the_trials(tmp_path, monkeypatch):
    """tune.py's charts: the objective is the validation HR@k of the study's k (not Optuna's "Objective
    Value"), and the trial axis has integer ticks."""
    optuna = pytest.importorskip("optuna")
    import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="s")
    study.set_user_attr(tune.SETTINGS_ATTR, {"--topk": 5})
    study.optimize(lambda t: t.suggest_float("lr", 0.0, 1.0) * t.suggest_float("beta1", 0.0, 1.0), n_trials=3)
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    tune.plot(study, str(tmp_path))
    history, importances = (figure.axes[0] for figure in figures)
    assert history.get_ylabel() == "validation HR@5"
    assert "validation HR@5" in history.get_title() and "Objective" not in history.get_title()
    ticks = [t for t in history.get_xticks() if history.get_xlim()[0] <= t <= history.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert "validation HR@5" in importances.get_title(loc="left")
    legend = [text.get_text() for text in importances.get_legend().get_texts()] if importances.get_legend() else []
    assert "Objective Value" not in legend
    for name in tune.PLOTS:
        assert tune.is_tune_plot(tmp_path / name)
