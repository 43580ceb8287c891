"""tune.py knows its noise (issue 25, part 1): every validation figure carries its binomial standard error; a
best configuration is confirmed with new seeds, chosen on their mean (never on the search's own figure or on
test figures), compared with ncf.py's defaults seed by seed, and named only if it wins beyond noise; a
stopped confirmation continues where it was; several workers together run --trials, not --trials each.

ncf.run is replaced by a stand-in that answers, at once, the figures of a table indexed by learning rate and
seed, and Optuna's sampler by a brute-force one, so that each test knows which trials the search makes.
"""
import json
import math
import re
import shutil
import threading
import time

import pytest
import torch

import ncf
import tune
from cache_format import METADATA_FILE, file_record

TINY = ["--factors", "8", "--layers", "32", "16", "8", "--opt_level", "O0", "-b", "4096"]
DEFAULTS, LUCKY, REAL = 0.0045, 0.001, 0.002  # ncf.py's default learning rate, and two others
SEARCH_SEED = 1  # ncf.py's default --seed: the search's trials run with it
NEW_SEEDS = (2, 3, 4)
USERS = 300  # make_tiny_cache's users, each with a validation item
pytestmark = pytest.mark.filterwarnings("ignore:BruteForceSampler is experimental")


@pytest.fixture(autouse=True)
def sigterm_handler_kept():
    """tune.main turns SIGTERM into KeyboardInterrupt: give the test process its own handler back."""
    import signal

    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


@pytest.fixture(autouse=True)
def brute_force(monkeypatch):
    """Each learning rate of the space once, the enqueued defaults first."""
    import optuna

    monkeypatch.setattr(optuna.samplers, "TPESampler",
                        lambda seed=None: optuna.samplers.BruteForceSampler(seed=seed))


def scripted(monkeypatch, table, interrupt_at=None):
    """ncf.run answers table[learning rate][seed] = (validation HR, test HR); returns the argv of every call.
    With `interrupt_at`, that call (1-based) is Ctrl-C instead."""
    calls = []

    def run(argv, on_epoch=None):
        calls.append(argv)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        args = ncf.parse_args(argv)
        valid, test = table[args.learning_rate][args.seed]
        if on_epoch is not None:
            on_epoch({"epoch": 1, "valid_hr": valid})
        return {"interrupted": False, "best_hr": test, "best_epoch": 1, "best_valid_hr": valid}

    monkeypatch.setattr(ncf, "run", run)
    return calls


def figures(search, new, test=0.5):
    """{seed: (validation HR, test HR)}: the search seed's figure, then one per new seed."""
    return {SEARCH_SEED: (search, test), **{seed: (value, test) for seed, value in zip(NEW_SEEDS, new, strict=True)}}


def tune_main(capsys, cache, out, *extra, rates=(DEFAULTS, LUCKY, REAL), trials=3, top=2):
    """(exit status, stdout, stderr) of a search over `rates` with a confirmation of the `top` leaders."""
    space = out.parent / f"{out.name}-space.json"
    space.write_text(json.dumps({"learning_rate": {"choices": list(rates)}}))
    argv = ["--data", str(cache), "--trials", str(trials), "--epochs", "1", "--output", str(out), "--space",
            str(space), "--no_plots", "--confirm_top", str(top), "--confirm_seeds", str(len(NEW_SEEDS)), *extra,
            "--", *TINY]
    try:
        tune.main(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out_text, err = capsys.readouterr()
    return status, out_text, err


def best_of(out):
    return json.loads((out / "ncf" / tune.BEST).read_text())


def trial_of(best, rate):
    """The number of the search's trial of learning rate `rate`, from best.json's confirmation."""
    record = best["confirmation"]
    rows = [*record["candidates"], record["defaults"]]
    (number,) = {c["trial"] for c in rows if c["params"]["learning_rate"] == rate}
    return number


def seeds_of(calls):
    return [ncf.parse_args(argv).seed for argv in calls]


# -- the standard error of every validation figure ------------------------------------------------------------


def _half_without_validation(folder, cache):
    """A copy of `cache` in which every other user has no validation item (checksums updated)."""
    copy = folder / "half"
    shutil.copytree(cache, copy)
    valid = torch.load(copy / "valid_ratings.pt", weights_only=True)
    valid[::2, 1] = -1
    torch.save(valid, copy / "valid_ratings.pt")
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["files"]["valid_ratings.pt"] = file_record(copy / "valid_ratings.pt")
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    return copy


def test_every_validation_figure_carries_its_binomial_standard_error_over_the_users_with_a_validation_item(
        tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """The n of sqrt(p (1 - p) / n) is the 150 users who have a validation item, not all 300."""
    scripted(monkeypatch, {DEFAULTS: figures(0.6, (0.6, 0.6, 0.6))})
    out = tmp_path / "out"
    status, printed, err = tune_main(capsys, _half_without_validation(tmp_path, tiny_validation_cache), out,
                                     rates=(DEFAULTS,), trials=1, top=0)
    assert status == 0, err
    se = math.sqrt(0.6 * 0.4 / 150)
    best = best_of(out)
    assert best["valid_users"] == 150 and math.isclose(best["valid_hr_se"], se)
    assert f"0.6000 ± {se:.4f}" in printed.split("\n")[1]  # the trial table's row
    final = json.loads(printed.strip().splitlines()[-1])
    assert math.isclose(final["valid_hr_se"], se) and final == best
    assert f"validation HR 0.6000 ± {se:.4f} (binomial SE over 150 users" in printed
    assert best["confirmation"] is None and "unconfirmed" in best["recommended"]["why"]


# -- the confirmation ------------------------------------------------------------------------------------------

# The search's best (LUCKY) won on its seed; with new seeds REAL is better, and beats the defaults clearly.
# Test figures favour LUCKY: a choice that looked at them would pick it.
CLEAR_WIN = {DEFAULTS: figures(0.60, (0.60, 0.61, 0.59)), LUCKY: figures(0.90, (0.55, 0.56, 0.54), test=0.95),
             REAL: figures(0.70, (0.80, 0.82, 0.81), test=0.30)}


def test_the_winner_is_chosen_on_new_seeds_and_beats_the_defaults_beyond_noise(tiny_validation_cache, tmp_path, capsys,
                                                                                monkeypatch):
    calls = scripted(monkeypatch, CLEAR_WIN)
    out = tmp_path / "out"
    status, printed, err = tune_main(capsys, tiny_validation_cache, out)
    assert status == 0, err
    best = best_of(out)
    real, lucky = trial_of(best, REAL), trial_of(best, LUCKY)
    assert best["trial"] == lucky and best["valid_hr"] == 0.90  # the search's best, reported as such
    record = best["confirmation"]
    assert record["seeds"] == list(NEW_SEEDS) and record["winner"] == real and record["beats_defaults"]
    assert record["paired"]["differences"] == pytest.approx([0.20, 0.21, 0.22])
    assert record["paired"]["better_on"] == 3 and record["recommended"] == real
    assert best["recommended"]["trial"] == real and "--learning_rate 0.002" in best["command"]
    assert f"trial {real} beats ncf.py's defaults beyond noise" in printed
    assert printed.strip().splitlines()[-2] == best["command"]
    # Two leaders and the defaults (not a leader), each with the three new seeds: nine runs, none twice.
    confirmation = calls[3:]
    assert sorted(seeds_of(confirmation)) == sorted(NEW_SEEDS * 3)
    assert len({tuple(argv) for argv in confirmation}) == 9


def test_a_win_inside_the_users_noise_is_none_and_the_defaults_are_recommended(tiny_validation_cache, tmp_path, capsys,
                                                                              monkeypatch):
    """+0.02 on every seed, but 300 users give each figure a standard error near 0.028."""
    scripted(monkeypatch, {DEFAULTS: figures(0.60, (0.60, 0.61, 0.59)), REAL: figures(0.70, (0.62, 0.63, 0.61))})
    out = tmp_path / "out"
    status, printed, err = tune_main(capsys, tiny_validation_cache, out, rates=(DEFAULTS, REAL), trials=2)
    assert status == 0, err
    best = best_of(out)
    record, real = best["confirmation"], trial_of(best, REAL)
    assert record["winner"] == real and record["paired"]["better_on"] == 3
    assert record["paired"]["mean"] == pytest.approx(0.02)
    expected_se = math.sqrt(0.62 * 0.38 / USERS + 0.60 * 0.40 / USERS)  # the differences do not spread
    assert record["paired"]["se"] == pytest.approx(expected_se)
    assert not record["beats_defaults"] and record["recommended"] == 0
    assert f"trial {real} does not beat ncf.py's defaults beyond noise" in printed and "use the defaults" in printed
    assert best["command"].endswith("--learning_rate 0.0045") and best["recommended"]["trial"] == 0


def against_the_defaults(cache, tmp_path, capsys, monkeypatch, defaults, real):
    """A two-trial search, the defaults and REAL with the scripted `figures`, then its confirmation: (the
    confirmation's record, what tune.py printed)."""
    scripted(monkeypatch, {DEFAULTS: defaults, REAL: real})
    out = tmp_path / "out"
    status, printed, err = tune_main(capsys, cache, out, rates=(DEFAULTS, REAL), trials=2)
    assert status == 0, err
    return best_of(out)["confirmation"], printed


def test_a_win_inside_the_seeds_noise_is_none(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """A mean difference of +0.12 whose seeds disagree (+0.30, -0.25, +0.30) is no win."""
    record, _ = against_the_defaults(tiny_validation_cache, tmp_path, capsys, monkeypatch,
                                     figures(0.50, (0.40, 0.70, 0.40)), figures(0.70, (0.70, 0.45, 0.70)))
    assert record["paired"]["mean"] == pytest.approx(0.35 / 3) and record["paired"]["better_on"] == 2
    assert not record["beats_defaults"] and record["recommended"] == 0


def test_the_comparison_is_seed_by_seed(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """The seeds move both configurations alike (0.3 to 0.9) and REAL is 0.1 above on each: a clear win that
    a comparison of the two means' own spreads would call noise."""
    record, _ = against_the_defaults(tiny_validation_cache, tmp_path, capsys, monkeypatch,
                                     figures(0.50, (0.30, 0.60, 0.90)), figures(0.70, (0.40, 0.70, 0.99)))
    assert record["beats_defaults"] and record["recommended"] == record["winner"] != 0


def test_the_defaults_leading_the_confirmation_are_recommended(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    record, printed = against_the_defaults(tiny_validation_cache, tmp_path, capsys, monkeypatch,
                                           figures(0.60, (0.70, 0.71, 0.69)), figures(0.80, (0.60, 0.61, 0.59)))
    assert record["winner"] == 0 and record["recommended"] == 0 and not record["beats_defaults"]
    assert "ncf.py's defaults (trial 0) lead the confirmation" in printed


def test_a_stopped_confirmation_continues_where_it_was(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the 4th of 9 confirmation runs: the next command runs the 6 that are left (the
    interrupted one again), and the verdict is the uninterrupted one's."""
    import optuna

    calls = scripted(monkeypatch, CLEAR_WIN, interrupt_at=3 + 4)
    out = tmp_path / "out"
    status, _, err = tune_main(capsys, tiny_validation_cache, out)
    assert status == 130, err
    first = calls[3:6]
    calls = scripted(monkeypatch, CLEAR_WIN)
    status, printed, err = tune_main(capsys, tiny_validation_cache, out)
    assert status == 0, err
    assert "3 trials finished" in printed and len(calls) == 6  # no search trial, six confirmation runs
    assert not {tuple(argv[-2:]) + tuple(argv[-4:-2]) for argv in calls} & \
        {tuple(argv[-2:]) + tuple(argv[-4:-2]) for argv in first}
    runs = optuna.load_study(study_name="ncf" + tune.CONFIRM, storage=f"sqlite:///{out / 'study.db'}").trials
    assert sorted(r.state.name for r in runs) == ["COMPLETE"] * 9 + ["FAIL"]
    record = best_of(out)["confirmation"]
    assert record["winner"] == trial_of(best_of(out), REAL) and record["beats_defaults"]


def test_a_confirmation_study_made_with_other_settings_is_refused(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """The search study was deleted and started again with other --epochs: the confirmation runs left in the
    storage were made with the old ones and are not mixed in."""
    import optuna

    calls = scripted(monkeypatch, CLEAR_WIN)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    assert tune_main(capsys, tiny_validation_cache, tmp_path / "a", "--storage", storage)[0] == 0
    calls.clear()
    optuna.delete_study(study_name="ncf", storage=storage)
    space = tmp_path / "a-space.json"
    argv = ["--data", str(tiny_validation_cache), "--trials", "3", "--epochs", "2", "--output", str(tmp_path / "b"),
            "--space", str(space), "--no_plots", "--storage", storage, "--", *TINY]
    with pytest.raises(SystemExit) as ended:
        tune.main(argv)
    assert ended.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "ncf.confirm" in line and "--epochs 1" in line and "--epochs 2" in line
    assert calls == []  # refused before the first trial


# -- several workers: --trials in all ----------------------------------------------------------------------------


def test_a_worker_stops_when_the_study_has_its_trials_counting_other_workers_running_ones(
        tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """Trial 0 is done and another worker runs trial 1: to reach --trials 3, this worker runs one trial, and
    asks for no trial that would only be refused as surplus."""
    import optuna

    calls = scripted(monkeypatch, CLEAR_WIN)
    out = tmp_path / "out"
    assert tune_main(capsys, tiny_validation_cache, out, trials=1, top=0)[0] == 0
    study = optuna.load_study(study_name="ncf", storage=f"sqlite:///{out / 'study.db'}")
    study.ask()  # another worker's running trial (no heartbeat yet: nobody fails it)
    status, printed, err = tune_main(capsys, tiny_validation_cache, out, trials=3, top=0)
    assert status == 0, err
    assert len(calls) == 2 and "1 trials finished, continuing to 3" in printed
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING", "COMPLETE"]
    assert not any(t.user_attrs.get(tune.SURPLUS_ATTR) for t in study.trials)


def test_a_trial_asked_for_after_the_last_slot_was_taken_runs_nothing(tiny_validation_cache, tmp_path, capsys,
                                                                      monkeypatch):
    """Two workers found the last slot free at the same moment: the database numbered their trials 1 and 2,
    and trial 2, beyond --trials 2, is refused as surplus without training; the study ends with two."""
    import optuna

    calls = scripted(monkeypatch, CLEAR_WIN)
    out = tmp_path / "out"
    assert tune_main(capsys, tiny_validation_cache, out, trials=1, top=0)[0] == 0
    study = optuna.load_study(study_name="ncf", storage=f"sqlite:///{out / 'study.db'}",
                              sampler=optuna.samplers.RandomSampler())  # the brute-force one stops loops
    rival, late = study.ask(), study.ask()
    args = tune.parse_args(["--data", str(tiny_validation_cache), "--trials", "2", "--output", str(out)])
    search = tune.Search(args, {"learning_rate": {"choices": [DEFAULTS, LUCKY]}}, ncf.parse_args(TINY),
                         str(out / "ncf"), USERS, "sqlite:///study.db", None, 1)
    with tune.SigtermWatch() as sigterm, pytest.raises(tune.Surplus):
        tune.make_objective(search, sigterm)(late)
    assert len(calls) == 1 and late.user_attrs.get(tune.SURPLUS_ATTR)
    study.tell(late, state=optuna.trial.TrialState.FAIL)
    study.tell(rival, 0.5)
    status, printed, err = tune_main(capsys, tiny_validation_cache, out, trials=2, top=0)
    assert status == 0, err
    assert len(calls) == 1 and "2 trials finished, continuing to 2" in printed
    assert [line.split()[1] for line in printed.splitlines()[2:5]] == ["done", "done", "surplus"]


def test_a_worker_that_joins_a_study_being_created_waits_for_it_and_does_not_enqueue_the_defaults_again(
        tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """Machine A has created the study and is about to enqueue the defaults' trial and record the settings;
    machine B loads it in between."""
    import optuna

    scripted(monkeypatch, CLEAR_WIN)
    assert tune_main(capsys, tiny_validation_cache, tmp_path / "first", trials=1, top=0)[0] == 0
    settings = optuna.load_study(study_name="ncf", storage=f"sqlite:///{tmp_path / 'first' / 'study.db'}").user_attrs
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="ncf", storage=storage, direction="maximize")  # A, before its records
    loaded = threading.Event()
    real_await = tune.await_settings

    def observed(study):
        loaded.set()
        return real_await(study)

    def machine_a():
        loaded.wait(30)
        time.sleep(0.3)  # B, if it did not wait, would enqueue first
        study.enqueue_trial({"learning_rate": DEFAULTS}, user_attrs={tune.DEFAULTS_ATTR: True})
        study.set_user_attr(tune.SETTINGS_ATTR, settings[tune.SETTINGS_ATTR])

    monkeypatch.setattr(tune, "await_settings", observed)
    creator = threading.Thread(target=machine_a)
    creator.start()
    try:
        status, _, err = tune_main(capsys, tiny_validation_cache, tmp_path / "b", "--storage", storage, trials=2, top=0)
    finally:
        creator.join()
    assert status == 0, err
    defaults = [t.number for t in study.trials if t.user_attrs.get(tune.DEFAULTS_ATTR)]
    assert defaults == [0] and study.trials[0].params == {"learning_rate": DEFAULTS}


def test_a_confirmation_run_enqueued_twice_runs_once(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """Two workers that planned the confirmation at the same moment both enqueued its runs: each runs once,
    and the later entry is marked surplus."""
    import optuna

    scripted(monkeypatch, CLEAR_WIN, interrupt_at=3 + 1)  # the plan is enqueued, its first run interrupted
    out = tmp_path / "out"
    assert tune_main(capsys, tiny_validation_cache, out)[0] == 130
    confirmation = optuna.load_study(study_name="ncf" + tune.CONFIRM, storage=f"sqlite:///{out / 'study.db'}")
    waiting = [r for r in confirmation.trials if r.state.name == "WAITING"]
    for run in waiting[:2]:  # the other worker's entries of the same runs
        confirmation.enqueue_trial(run.system_attrs["fixed_params"], user_attrs=run.user_attrs)
    calls = scripted(monkeypatch, CLEAR_WIN)
    status, _, err = tune_main(capsys, tiny_validation_cache, out)
    assert status == 0, err
    assert len(calls) == 9 and len({tuple(argv) for argv in calls}) == 9
    runs = optuna.load_study(study_name="ncf" + tune.CONFIRM, storage=f"sqlite:///{out / 'study.db'}").trials
    assert sum(bool(r.user_attrs.get(tune.SURPLUS_ATTR)) for r in runs) == 2
    assert best_of(out)["confirmation"]["beats_defaults"]


def test_the_defaults_trial_runs_the_defaults_the_space_excludes(tiny_validation_cache, tmp_path, capsys, monkeypatch):
    """ncf.py's --weight_decay 0 lies outside the space: Optuna would sample it for the enqueued defaults'
    trial, and the winner would be compared with "defaults" that are not. The trial and its confirmation runs
    take the default as it is, and best.json and the table say so."""
    calls = scripted(monkeypatch, CLEAR_WIN)
    out = tmp_path / "out"
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"choices": [DEFAULTS, LUCKY, REAL]},
                                 "weight_decay": {"choices": [0.01, 0.1]}}))
    argv = ["--data", str(tiny_validation_cache), "--trials", "3", "--epochs", "1", "--output", str(out), "--space",
            str(space), "--no_plots", "--confirm_top", "1", "--confirm_seeds", str(len(NEW_SEEDS)), "--", *TINY]
    tune.main(argv)
    printed = capsys.readouterr().out
    decays = [ncf.parse_args(argv).weight_decay for argv in calls]
    defaults_runs = [d for argv, d in zip(calls, decays, strict=True) if ncf.parse_args(argv).learning_rate == DEFAULTS]
    assert decays[0] == 0.0 and defaults_runs == [0.0] * (1 + len(NEW_SEEDS))  # the trial, then its 3 seeds
    assert all(d in (0.01, 0.1) for argv, d in zip(calls, decays, strict=True)
               if ncf.parse_args(argv).learning_rate != DEFAULTS)
    assert best_of(out)["confirmation"]["defaults"]["params"] == {"learning_rate": DEFAULTS, "weight_decay": 0.0}
    assert re.search(r"^\s+0\s+done\s.*0\.0045\s+0$", printed, re.M), printed
