"""Search ncf.py's hyperparameters with Optuna, selecting on the validation split (never on test figures).

    ./prepare_dataset.sh synthetic --validation            # a cache with a validation split
    python tune.py --data data/cache/synthetic-validation --trials 30 --epochs 10 --output runs/tune
    python tune.py --data ... --trials 60 --output runs/tune          # continue the same study to 60 trials
    python tune.py --data ... --space space.json -- --opt_level O0    # own search space; fixed ncf.py flags

Each trial trains ncf.py's own training loop in this process with the flags the sampler (TPE, seeded by
--seed) proposes (a new study's first trial: ncf.py's defaults, where the space admits them), reports
the validation HR@k after every epoch, and is pruned when it falls behind the median of earlier trials
at the same epoch (Optuna's MedianPruner). A trial that fails (a diverged
run, a bad combination of flags) is recorded as failed and the search goes on. Its value is the
validation HR@k of its best epoch; the test HR@k of that epoch is recorded beside it, only to report.

The study is stored in SQLite (OUTPUT/study.db) by default, so a search stopped with Ctrl-C continues
where it was by running the same command again: --trials is the number of finished trials the study
should reach. Several machines share one search by passing the same --storage (any database URL
Optuna accepts, e.g. postgresql://...) and --study_name. At the end: a table of the trials, the best
flags as a ready ncf.py command and as OUTPUT/best.json, and plots of the search (optimisation history
and parameter importances) as PNG files.

The search space is a JSON object, one entry per ncf.py flag (long name without dashes):
{"low": A, "high": B} (floats; add "log": true for a log scale; integers when A and B are integers)
or {"choices": [...]} (for --layers, strings such as "64 32 16"). DEFAULT_SPACE below is the default.
"""
import cli  # noqa: F401, I001  (sets the OpenMP wait policy before torch loads)

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import sys
import warnings

from cli import UserError, check_output_path, main_guard

DEFAULT_SPACE = {
    "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "batch_size": {"choices": [1024, 2048, 4096, 8192, 16384]},
    "beta1": {"low": 0.1, "high": 0.95},
    "beta2": {"low": 0.4, "high": 0.999},
    "factors": {"choices": [8, 16, 32, 64]},
    "layers": {"choices": ["32 16 8", "64 32 16", "128 64 32", "256 128 64", "256 256 128 64"]},
    "dropout": {"low": 0.0, "high": 0.6},
    "negative_samples": {"low": 1, "high": 8},
    # Decoupled decay shrinks every row by lr * weight_decay per step, so with learning rates near 1e-3
    # values below 1e-3 change nothing in a few thousand steps, and values near 1 erase the embeddings.
    "weight_decay": {"low": 1e-3, "high": 1.0, "log": True},
    "model": {"choices": ["neumf", "gmf", "mlp"]},
}
# Flags a trial sets itself, or that make no sense to search.
RESERVED = {"data", "epochs", "checkpoint_dir", "log_path", "mode", "resume", "load_checkpoint_path",
            "no_progress", "local_rank", "init_gmf", "init_mlp"}
HEARTBEAT_S, GRACE_S = 60, 180  # a running trial's liveness signal, and how old it may get
MARKER = "tune.json"  # written first into OUTPUT: a folder with it is provably tune.py's
OWN_NAMES = {MARKER, "study.db", "best.json", "trials", "optimization_history.png", "param_importances.png"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="cache with a validation split (convert.py --validation)")
    p.add_argument("--trials", type=int, default=30, help="finished trials the study should reach")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (early stopping may end it sooner)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--space", default=None, help="JSON file of the search space (default: DEFAULT_SPACE)")
    p.add_argument("--output", default="runs/tune", help="folder of the study, trial checkpoints, best.json, plots")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUTPUT/study.db)")
    p.add_argument("--study_name", default="ncf", help="name of the study in the storage")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("ncf_args", nargs=argparse.REMAINDER,
                   help="after --: ncf.py flags every trial uses (not searched), e.g. -- --opt_level O0")
    args = p.parse_args(argv)
    args.ncf_args = args.ncf_args[1:] if args.ncf_args[:1] == ["--"] else args.ncf_args
    return args


def load_space(path, ncf_flags):
    """The search space, checked: every entry a flag of ncf.py with a valid range or list of choices."""
    if path is None:
        return DEFAULT_SPACE
    try:
        with open(path) as f:
            space = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--space {path}: cannot read it as JSON ({err})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--space {path} must be a JSON object with one entry per flag")
    for name, spec in space.items():
        if name not in ncf_flags or name in RESERVED:
            raise UserError(f"--space {path}: '{name}' is not a flag tune.py can search; use ncf.py's long flag "
                            f"names without dashes, e.g. learning_rate")
        choices_ok = isinstance(spec, dict) and isinstance(spec.get("choices"), list) and spec["choices"]
        range_ok = isinstance(spec, dict) and all(isinstance(spec.get(k), int | float) and not isinstance(
            spec.get(k), bool) for k in ("low", "high")) and spec["low"] <= spec["high"]
        if not (choices_ok or range_ok) or (range_ok and spec.get("log") and spec["low"] <= 0):
            raise UserError(f"--space {path}: '{name}' needs {{\"low\": A, \"high\": B}} (A <= B, A > 0 with "
                            f"\"log\") or {{\"choices\": [...]}}, got {json.dumps(spec)[:80]}")
    return space


def suggest(trial, space):
    """The trial's flags as {name: value}."""
    params = {}
    for name, spec in space.items():
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"])
        else:
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
    return params


def flags_of(params):
    """ncf.py command-line flags for {name: value}."""
    argv = []
    for name, value in params.items():
        argv += [f"--{name}", *str(value).split()] if name == "layers" else [f"--{name}", str(value)]
    return argv


def enqueue_defaults(study, space, defaults):
    """A new study's first trial: ncf.py's defaults (with the fixed flags) for every searched flag whose
    default the space admits, the rest sampled. The search then starts from the recipe's setting."""
    if study.trials:
        return
    params = {}
    for name, spec in space.items():
        value = getattr(defaults, name)
        value = " ".join(map(str, value)) if name == "layers" else value
        admitted = value in spec["choices"] if "choices" in spec else spec["low"] <= value <= spec["high"]
        if admitted:
            params[name] = value
    study.enqueue_trial(params)


@contextlib.contextmanager
def heartbeat_api(optuna):
    """Optuna's heartbeat calls, without their warning: "experimental" since Optuna 2.9, and what its
    own docs advise for trials of killed processes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(optuna, url):
    """The study's database, with a heartbeat: a trial whose process was killed (kill -9, a lost machine)
    is marked failed once its heartbeat is GRACE_S old, instead of staying "running" for ever."""
    with heartbeat_api(optuna):
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)


def make_pruner(optuna, epochs):
    """Median pruning, not before a quarter of the epochs: a regularised model (weight decay, dropout)
    climbs more slowly at first and overtakes later, and pruning it at epoch 2 lost exactly those."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(2, epochs // 4))


def make_objective(args, space, trials_dir):
    import optuna

    import ncf

    def objective(trial):
        params = suggest(trial, space)
        folder = os.path.join(trials_dir, str(trial.number))
        argv = ["--data", args.data, "-e", str(args.epochs), "--checkpoint_dir", folder, "--no_progress",
                "--log_path", os.path.join(folder, "log.json"), *args.ncf_args, *flags_of(params)]

        def on_epoch(record):
            trial.report(record["valid_hr"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.log"), "w") as out, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                summary = ncf.run(argv, on_epoch)
            except UserError as error:
                trial.set_user_attr("error", str(error))
                raise
            finally:
                trial.set_user_attr("stderr", err.getvalue()[-500:])
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(folder, ncf.LAST_CHECKPOINT))  # ours, and large: model.pth stays
        if summary["interrupted"]:  # SIGTERM: the trial stopped early, so its figure is not the flags' own
            raise KeyboardInterrupt
        trial.set_user_attr("test_hr", summary["best_hr"])
        trial.set_user_attr("best_epoch", summary["best_epoch"])
        return summary["best_valid_hr"]

    return objective


def report_failure(study, trial):
    """One line for a failed trial (a diverged run, flags ncf.py refuses); the search goes on."""
    if trial.state.name == "FAIL":
        print(f"tune.py: trial {trial.number} failed: {trial.user_attrs.get('error', 'see its train.log')}",
              file=sys.stderr)


def check_output(folder):
    """OUTPUT may be new, empty, or a folder this script wrote (its marker and its own names only)."""
    check_output_path(folder, "--output", folder=True)
    if os.path.isdir(folder) and os.listdir(folder):
        names = set(os.listdir(folder))
        if MARKER not in names or not names <= OWN_NAMES:
            raise UserError(f"--output {folder} holds files tune.py did not write: choose a new or empty folder")


def check_data(path):
    from dataloading import load_cache

    cache = load_cache(path)
    if not cache.has_validation:
        raise UserError(f"--data {path} has no validation split, and tune.py never selects on test figures: "
                        f"rebuild it with ./prepare_dataset.sh NAME --validation (or convert.py --validation)")


def print_table(study):
    import optuna

    names = sorted({name for t in study.trials for name in t.params})
    print(f"{'trial':>5} {'state':>8} {'valid HR':>9} {'test HR':>8}  " + "  ".join(names))
    for t in study.trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        test = t.user_attrs.get("test_hr")
        params = "  ".join(f"{t.params[n]:.3g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, "-"))
                           for n in names)
        state = t.state.name.lower() if t.state != optuna.trial.TrialState.COMPLETE else "done"
        print(f"{t.number:>5} {state:>8} {value:>9} {f'{test:.4f}' if test is not None else '-':>8}  {params}")


def report_best(study, args, output):
    best = study.best_trial
    command = shlex.join(["python", "ncf.py", "--data", args.data, "-e", str(args.epochs), *args.ncf_args,
                          *flags_of(best.params)])
    record = {"study": study.study_name, "trial": best.number, "valid_hr": best.value,
              "test_hr_of_that_trial": best.user_attrs.get("test_hr"), "best_epoch": best.user_attrs.get("best_epoch"),
              "params": best.params, "fixed_flags": args.ncf_args, "epochs": args.epochs, "command": command}
    with open(os.path.join(output, "best.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"\nbest trial {best.number}: validation HR {best.value:.4f} (test HR of that trial "
          f"{best.user_attrs.get('test_hr', float('nan')):.4f}, reported, not used to choose)\n{command}")
    print(json.dumps(record))


def plot(study, output):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib, or pass --no_plots") from None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, draw in (("optimization_history.png", optuna_plots.plot_optimization_history),
                           ("param_importances.png", optuna_plots.plot_param_importances)):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:  # importances need 2+ finished trials that differ
                print(f"no {name}: {err}")
                continue
            axes.figure.savefig(os.path.join(output, name), dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
            print(f"wrote {os.path.join(output, name)}")


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune.py needs Optuna: pip install -r requirements-tune.txt") from None
    # Optuna would log a failed trial with its traceback; report_failure says it in one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


@main_guard
def main(argv=None):
    args = parse_args(argv)
    for flag, value in (("--trials", args.trials), ("--epochs", args.epochs)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    import ncf

    space = load_space(args.space, set(vars(ncf.parse_args([]))))
    fixed = ncf.given_flags(args.ncf_args)  # also rejects flags ncf.py does not know, with argparse's message
    if fixed & (set(space) | RESERVED):
        raise UserError(f"--{sorted(fixed & (set(space) | RESERVED))[0]} after -- is searched or set by tune.py "
                        f"itself: leave it out, or take it out of the search space (--space)")
    check_output(args.output)
    check_data(args.data)
    optuna = import_optuna()
    # SIGTERM ends the search as Ctrl-C does (a trial then running stops after its epoch, and is failed).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, MARKER), "w") as f:
        json.dump({"created_by": "tune.py", "data": args.data, "space": space}, f, indent=1)
    storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(args.output, 'study.db'))}"
    study = optuna.create_study(study_name=args.study_name, storage=make_storage(optuna, storage),
                                load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=args.seed),
                                pruner=make_pruner(optuna, args.epochs))
    with heartbeat_api(optuna):
        optuna.storages.fail_stale_trials(study)
    enqueue_defaults(study, space, ncf.parse_args(args.ncf_args))
    done = sum(t.state.is_finished() for t in study.trials)
    if done:
        print(f"study {args.study_name} in {storage}: {done} trials finished, continuing to {args.trials}")
    try:
        if args.trials > done:
            study.optimize(make_objective(args, space, os.path.join(args.output, "trials")),
                           n_trials=args.trials - done, timeout=args.timeout, catch=(UserError,),
                           callbacks=[report_failure], show_progress_bar=sys.stderr.isatty())
    finally:
        print_table(study)
    if not any(t.value is not None for t in study.trials):
        raise UserError("no trial finished: see OUTPUT/trials/N/train.log and widen or fix the search space")
    report_best(study, args, args.output)
    if not args.no_plots:
        plot(study, args.output)


if __name__ == "__main__":
    main()
