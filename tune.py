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
should reach. A study records what its figures mean (the data, --epochs, the fixed ncf.py flags, k, the
space) when it is created, and a continuation that differs is refused, naming the difference. Several
machines share one search by passing the same --storage (any database URL Optuna accepts, e.g.
postgresql://...) and --study_name. Each study has its folder OUTPUT/STUDY_NAME: its trials (trials/N),
and at the end best.json (the best flags, also printed as a ready ncf.py command) and plots of the
search (optimisation history and parameter importances).

The search space is a JSON object, one entry per searchable ncf.py flag (long name without dashes,
SEARCHABLE below): {"low": A, "high": B} for a number (add "log": true for a log scale) or
{"choices": [...]} (for --layers, strings such as "64 32 16"). DEFAULT_SPACE below is the default.
Every choice and both ends of every range are checked by ncf.py's own parser before the first trial.
"""
import cli  # noqa: F401, I001  (sets the OpenMP wait policy before torch loads)

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import signal
import sqlite3
import sys
import urllib.parse
import warnings

from cli import (CREATED_BY, UserError, check_identity, check_may_write, check_output_path, json_marker, main_guard,
                 open_owned_for_append, owned_file, proven, remove_owned)

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
# Only what changes the model or how it is trained is searchable (spec 6.6). Left out on purpose: flags that
# change the measure, not the model (topk, threshold, patience, full_ranking: a search over k picks the
# largest k), the seed (a search over it fits one seed's noise), and flags that change speed or memory but
# not the result by design (valid_batch_size, grads_accumulated, opt_level, amp_dtype, device, save_every):
# a search would rank their noise. Fix any of those after --.
SEARCHABLE = ("learning_rate", "batch_size", "beta1", "beta2", "eps", "factors", "layers", "dropout",
              "negative_samples", "weight_decay", "model", "lr_schedule", "warmup_epochs")
# Flags a trial sets itself: refused after --.
RESERVED = {"data", "epochs", "checkpoint_dir", "log_path", "mode", "resume", "load_checkpoint_path",
            "no_progress", "local_rank", "init_gmf", "init_mlp"}
# Fixed flags that change neither the training nor its figures, left out of a study's settings: another
# machine may continue the study on its own device, with an evaluation batch or accumulation that fits it.
NOT_SETTINGS = {"device", "valid_batch_size", "grads_accumulated", "save_every"}
SETTINGS_ATTR = "tune_settings"  # the study's user attribute that records them
HEARTBEAT_S, GRACE_S = 60, 180  # a running trial's liveness signal, and how old it may get
MARKER = "tune.json"  # its content (created_by), not its name, makes OUTPUT a folder of tune.py's
DEFAULT_DB = "study.db"
BEST = "best.json"
PLOTS = ("optimization_history.png", "param_importances.png")
TRIAL_LOG, TRIAL_LOG_HEAD = "train.log", "tune.py trial "  # the log's first line proves it is ours
# A study names its folder OUTPUT/STUDY_NAME, so a name is a plain file name; without dots it cannot be
# tune.json, study.db or one of SQLite's study.db-journal files.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
# pip packages of the database drivers SQLAlchemy imports, where the package is not named as the module.
DRIVER_PACKAGES = {"psycopg": "'psycopg[binary]'", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                   "pymysql": "PyMySQL", "mysql": "mysql-connector-python"}
is_tune_json = json_marker("tune.py")  # the proof for tune.json and best.json
PLOT_TAG = b"tEXt" + CREATED_BY.encode() + b"\x00tune.py"  # the text chunk plot() puts into its PNGs


def is_tune_plot(path):
    """A proof (cli.may_write) for the plots: a PNG with the text chunk that says tune.py wrote it."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.startswith(b"\x89PNG\r\n\x1a\n") and PLOT_TAG in head


def is_trial_log(path):
    """A proof for a trial's train.log: its first line is the one tune.py writes."""
    with open(path) as f:
        return f.readline().startswith(TRIAL_LOG_HEAD)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="cache with a validation split (convert.py --validation)")
    p.add_argument("--trials", type=int, default=30, help="finished trials the study should reach")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (early stopping may end it sooner)")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--space", default=None, help="JSON file of the search space (default: DEFAULT_SPACE)")
    p.add_argument("--output", default="runs/tune",
                   help="folder of the study database and of one folder per study (trials, best.json, plots)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUTPUT/study.db)")
    p.add_argument("--study_name", default="ncf", help="name of the study in the storage, and of its folder")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("ncf_args", nargs=argparse.REMAINDER,
                   help="after --: ncf.py flags every trial uses (not searched), e.g. -- --opt_level O0")
    args = p.parse_args(argv)
    args.ncf_args = args.ncf_args[1:] if args.ncf_args[:1] == ["--"] else args.ncf_args
    return args


def check_flags(args):
    for flag, value in (("--trials", args.trials), ("--epochs", args.epochs)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserError(f"--timeout is the seconds after which no new trial starts: give a positive number, "
                        f"got {args.timeout}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if not STUDY_NAME.fullmatch(args.study_name):
        raise UserError(f"--study_name {args.study_name!r}: it also names the study's folder in --output, so use "
                        f"letters, digits, _ and - (up to 100), e.g. ncf-lr")


# -- the search space --------------------------------------------------------------------------------------


def parse_ncf(ncf, argv, where):
    """ncf.py's own parser on `argv`, its complaint as a UserError (argparse prints usage and exits)."""
    parser = ncf.build_parser()

    def refuse(message):
        raise UserError(f"{where}: {message}" if where else message)

    parser.error = refuse
    return parser.parse_args(argv)


def numeric_flags(ncf):
    """{name: int or float} for ncf.py's flags that take one number: the only ones a range can cover."""
    return {a.dest: a.type for a in ncf.build_parser()._actions if a.type in (int, float) and a.nargs is None}


def read_space(path):
    if path is None:
        return DEFAULT_SPACE
    try:
        with open(path) as f:
            space = json.load(f)
    except (OSError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--space {path}: cannot read it as JSON ({reason})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--space {path} must be a JSON object with one entry per flag")
    return space


def is_number(value, kind):
    if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
        return False
    return kind is int or math.isfinite(value)


def check_entry(name, spec, numeric, known, where):
    """One entry of the space: a searchable flag with a list of choices or a finite range of its type."""
    if name not in SEARCHABLE:
        why = "is not a training hyperparameter" if name in known else "is not a flag of ncf.py"
        raise UserError(f"{where}: '{name}' {why}; searchable: {', '.join(SEARCHABLE)} (fix others after --)")
    shape = isinstance(spec, dict) and set(spec) <= {"choices", "low", "high", "log"} and \
        ("choices" in spec) != ("low" in spec or "high" in spec)
    if not shape or ("choices" in spec and not (isinstance(spec["choices"], list) and spec["choices"])):
        raise UserError(f"{where}: '{name}' needs {{\"low\": A, \"high\": B}} (\"log\": true for a log scale) or "
                        f"{{\"choices\": [...]}}, got {json.dumps(spec)[:80]}")
    if "choices" in spec:
        return
    if name not in numeric:
        raise UserError(f"{where}: '{name}' does not take one number, so it has no range: give "
                        f"{{\"choices\": [...]}}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: '{name}': \"log\" must be true or false, got {json.dumps(log)}")
    low, high, kind = spec.get("low"), spec.get("high"), numeric[name]
    if not (is_number(low, kind) and is_number(high, kind) and low <= high and (low > 0 or not log)):
        what = "integers" if kind is int else "finite numbers"
        above = " above 0 (log scale)" if log else ""
        raise UserError(f"{where}: '{name}' needs \"low\" <= \"high\", both {what}{above}, got {json.dumps(spec)[:80]}")


def check_values(ncf, space, fixed_argv, where):
    """Every choice and both ends of every range through ncf.py's own parser and checks, beside the fixed
    flags: a value ncf.py refuses is found before the first trial, not in it (its checks are bounds, so the
    ends of a range stand for what lies between). The other flags are at ncf.py's defaults or, where those
    break a rule across flags (--batch_size and --grads_accumulated), at the space's first values."""
    first = {name: spec["choices"][0] if "choices" in spec else spec["low"] for name, spec in space.items()}

    def refusal(params):
        try:
            ncf.validate_args(parse_ncf(ncf, [*fixed_argv, *flags_of(params)], None))
        except UserError as err:
            return str(err)
        except OverflowError:  # an integer too large for ncf.py's float comparisons
            return "too large a number"
        return None

    base = {} if refusal({}) is None else first
    if reason := refusal(base):
        raise UserError(f"{where}: ncf.py refuses the flags after -- beside the space's first values ({reason}): "
                        "change one or the other")
    for name, spec in space.items():
        for value in spec["choices"] if "choices" in spec else (spec["low"], spec["high"]):
            if reason := refusal({**base, name: value}):
                raise UserError(f"{where}: {name} {json.dumps(value)[:40]} is refused by ncf.py ({reason}): take it "
                                "out of the space")


def load_space(path, ncf, fixed_argv):
    """The search space, checked entry by entry and value by value (see check_entry, check_values)."""
    where = f"--space {path}" if path else "the default space"
    space = read_space(path)
    known, numeric = set(vars(ncf.parse_args([]))), numeric_flags(ncf)
    for name, spec in space.items():
        check_entry(name, spec, numeric, known, where)
    overlap = ncf.given_flags(fixed_argv) & (set(space) | RESERVED)
    if overlap:
        raise UserError(f"--{sorted(overlap)[0]} after -- is searched or set by tune.py itself: leave it out, or "
                        f"take it out of the search space (--space)")
    check_values(ncf, space, fixed_argv, where)
    return space


def suggest(trial, space, integers):
    """The trial's flags as {name: value}; `integers` names the flags that take an int."""
    params = {}
    for name, spec in space.items():
        log = spec.get("log", False)
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif name in integers:
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=log)
        else:  # a float flag's range is continuous even if its ends are written as integers
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=log)
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


# -- the storage ---------------------------------------------------------------------------------------------


def optuna_tables():
    """The tables Optuna's RDBStorage creates: its models' and Alembic's version table."""
    from optuna.storages._rdb import models

    return set(models.BaseModel.metadata.tables) | {"alembic_version"}


def check_storage(url, given):
    """Refuse in one line, before Optuna writes, a --storage that is no database URL, needs a driver that is
    not installed, or holds tables that are not Optuna's (another application's database). Returns the URL
    to print (without its password)."""
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise UserError(f"--storage {url} is not a database URL: give one such as sqlite:///PATH/study.db or "
                        "postgresql://USER@HOST/DB (or leave --storage out: OUTPUT/study.db)") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # SQLAlchemy 1.4 names it dbapi
    except exc.NoSuchModuleError:
        raise UserError(f"--storage {shown}: '{parsed.drivername}' is no database SQLAlchemy knows: use sqlite:///, "
                        "postgresql://, mysql:// ...") from None
    except ImportError as err:
        raise UserError(f"--storage {shown} needs the {parsed.get_backend_name()} driver {err.name}, which is not "
                        f"installed: pip install {DRIVER_PACKAGES.get(err.name, err.name)}") from None
    tables = sqlite_tables(parsed, shown, given) if parsed.get_backend_name() == "sqlite" else \
        server_tables(parsed, shown)
    foreign = sorted(name for name in set(tables) - optuna_tables() if not name.startswith("sqlite_"))
    if foreign:
        raise UserError(f"--storage {shown} holds tables that are not Optuna's ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}): it is another application's database, and tune.py "
                        "does not write into it; give a database of its own")
    return shown


def sqlite_tables(parsed, shown, given):
    """The tables of an SQLite --storage, read without writing (a new or empty file has none)."""
    path = parsed.database
    if not path or path == ":memory:" or parsed.query.get("mode") == "memory" or parsed.query.get("uri"):
        raise UserError(f"--storage {shown}: give the path of a database file, sqlite:///PATH/study.db (an "
                        "in-memory database would lose the study when tune.py ends)")
    folder = os.path.dirname(os.path.abspath(path))
    if given and not os.path.isdir(folder):
        raise UserError(f"--storage {shown}: the folder {folder} does not exist: create it, or name a file in an "
                        "existing folder")
    if os.path.isdir(path):
        raise UserError(f"--storage {shown}: {path} is a folder: name a database file in it, e.g. "
                        f"sqlite:///{os.path.join(path, DEFAULT_DB)}")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    try:  # read-only: reading must leave a file that is not ours as it was
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro",
                                                uri=True)) as db:
            return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    except sqlite3.DatabaseError as err:
        raise UserError(f"--storage {shown}: {path} cannot be read as an SQLite database ({err}): name a new "
                        "file, or the study.db of an earlier search") from None


def server_tables(parsed, shown):
    """The tables of a database server's --storage."""
    from sqlalchemy import create_engine, exc, inspect

    try:
        engine = create_engine(parsed)
        try:
            return inspect(engine).get_table_names()
        finally:
            engine.dispose()
    except exc.SQLAlchemyError as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"--storage {shown}: cannot read its tables ({reason}): check the URL, the server and "
                        "the credentials") from None


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
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    with heartbeat_api(optuna):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except (SQLAlchemyError, RuntimeError) as err:  # RuntimeError: a schema of another Optuna version
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"--storage {make_url(url).render_as_string(hide_password=True)}: cannot open it "
                            f"({reason})") from None


def make_pruner(optuna, epochs):
    """Median pruning, not before a quarter of the epochs: a regularised model (weight decay, dropout)
    climbs more slowly at first and overtakes later, and pruning it at epoch 2 lost exactly those."""
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(2, epochs // 4))


# -- what a study's figures mean -----------------------------------------------------------------------------


def study_settings(epochs, space, fixed, metadata):
    """What a study's figures mean, recorded when it is created and compared when it is continued: --epochs,
    every ncf.py flag its trials run with but do not search (k among them; parsed, so -f 8 and --factors 8
    are one setting, and a default is a setting too), the space and the data (its evaluation identity)."""
    from cache_format import evaluation_identity

    flags = {f"--{name}": value for name, value in vars(fixed).items()
             if name not in RESERVED | NOT_SETTINGS and name not in space}
    # One short entry per searchable flag, so that a difference is named in one readable line.
    searched = {f"--space {name}": space_entry(space[name]) if name in space else "not searched" for name in SEARCHABLE}
    data = {f"--data {key}": value for key, value in evaluation_identity(metadata).items()}
    return {"--epochs": epochs, **flags, **searched, **data}


def space_entry(spec):
    if "choices" in spec:
        return json.dumps(spec["choices"])
    return f"{json.dumps(spec['low'])}..{json.dumps(spec['high'])}{' log' if spec.get('log') else ''}"


def check_settings(study, settings, where):
    """Record a new study's settings, or refuse to continue one whose settings differ (cli.check_identity)."""
    if study.user_attrs.get(SETTINGS_ATTR) is None:
        if study.trials:
            raise UserError(f"{where} has {len(study.trials)} trials but no record of the data, epochs and flags "
                            "they ran with (an older tune.py or another program made it), so new trials cannot be "
                            "ranked with them: start a new study (another --study_name)")
        study.set_user_attr(SETTINGS_ATTR, settings)
    # Read back: of two machines that started one study at once, the one whose record lost finds out here.
    check_identity(study.user_attrs[SETTINGS_ATTR], settings, where,
                   "continue it with the settings it was started with, or start a new study (another --study_name)")


# -- the output folder ---------------------------------------------------------------------------------------


def check_output(args):
    """Before any work: OUTPUT is new, empty or tune.py's (its tune.json says so, by content), and the files
    of this study that the search replaces are tune.py's. Returns the study's folder."""
    check_output_path(args.output, "--output", folder=True)
    marker = os.path.join(args.output, MARKER)
    if os.path.isdir(args.output) and os.listdir(args.output) and not (
            os.path.isfile(marker) and proven(is_tune_json, marker)):
        raise UserError(f"--output {args.output} holds files and no {MARKER} that tune.py wrote, so it is not a "
                        "tune.py folder: choose a new or empty folder")
    check_may_write(marker, "--output", is_tune_json, f"a {MARKER}")
    study_dir = os.path.join(args.output, args.study_name)
    check_output_path(study_dir, "--output", folder=True)
    check_may_write(os.path.join(study_dir, BEST), "--output", is_tune_json, f"a {BEST}")
    for name in () if args.no_plots else PLOTS:
        check_may_write(os.path.join(study_dir, name), "--output", is_tune_plot, "a plot")
    return study_dir


def claim_output(folder):
    """OUTPUT and its tune.json (kept if there)."""
    marker = os.path.join(folder, MARKER)
    if os.path.isfile(marker) and proven(is_tune_json, marker):
        return
    with owned_file(marker, "--output", is_tune_json, f"a {MARKER}") as f:
        f.write(json.dumps({CREATED_BY: "tune.py", "layout": f"{DEFAULT_DB} (the default --storage), and per study "
                            f"STUDY_NAME/{BEST}, STUDY_NAME/*.png, STUDY_NAME/trials/N/"}, indent=1).encode())


def check_trial_folders(study_dir, study, where):
    """STUDY_NAME/trials holds only trials of this study: a folder of a number the study has not given out
    belongs to another study of that name (in another storage), whose files the new trial would mix with."""
    trials = os.path.join(study_dir, "trials")
    names = os.listdir(trials) if os.path.isdir(trials) else []  # listed first: numbers given out are older
    numbers = len(study.trials)
    stray = sorted(name for name in names if not (name.isdigit() and int(name) < numbers))
    if stray:
        raise UserError(f"{os.path.join(trials, stray[0])} is no trial of {where} (it has {numbers} trials): the "
                        "folder belongs to another study of that name; choose another --output or --study_name")


def check_data(path):
    """The cache's metadata, once it is known to hold a validation split."""
    from dataloading import load_cache

    cache = load_cache(path)
    if not cache.has_validation:
        raise UserError(f"--data {path} has no validation split, and tune.py never selects on test figures: "
                        f"rebuild it with ./prepare_dataset.sh NAME --validation (or convert.py --validation)")
    return cache.metadata


# -- the trials ----------------------------------------------------------------------------------------------


class SigtermWatch:
    """Sees SIGTERM under any handler. While ncf.py trains, its handler takes SIGTERM and stops the run after
    the epoch; a trial pruned (or failed) at that epoch ends first, and the request would be lost. The
    interpreter writes every signal to the wakeup fd, whichever Python handler is installed."""

    def __enter__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._seen = False
        return self

    def __exit__(self, *exc_info):
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)

    def arrived(self):
        """True if SIGTERM came since the last clear()."""
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self._read, 512):
                self._seen |= signal.SIGTERM in data
        return self._seen

    def clear(self):
        self.arrived()
        self._seen = False


def new_trial_folder(folder):
    if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        raise UserError(f"{folder} exists (a trial of another study of this name?), and a trial writes only into a "
                        "new folder: move it away")
    os.makedirs(folder, exist_ok=True)


def run_trial(ncf, trial, argv, folder, on_epoch, sigterm):
    """ncf.run(argv) with its output in FOLDER/train.log; its summary. A SIGTERM that came during it ends
    the search (KeyboardInterrupt) however the trial ended."""
    import checkpoint

    sigterm.clear()
    with open_owned_for_append(os.path.join(folder, TRIAL_LOG), "--output", is_trial_log, "a trial log") as out, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        print(f"{TRIAL_LOG_HEAD}{trial.number}: python ncf.py {shlex.join(argv)}")
        try:
            return ncf.run(argv, on_epoch)
        finally:
            trial.set_user_attr("stderr", err.getvalue()[-500:])
            remove_owned(os.path.join(folder, ncf.LAST_CHECKPOINT), checkpoint.is_checkpoint_file)  # large
            if sigterm.arrived():
                raise KeyboardInterrupt  # it wins over the pruning or the failure


def make_objective(args, space, study_dir, sigterm):
    import optuna

    import ncf

    integers = {name for name, kind in numeric_flags(ncf).items() if kind is int}

    def objective(trial):
        params = suggest(trial, space, integers)
        folder = os.path.join(study_dir, "trials", str(trial.number))
        fixed = ["-e", str(args.epochs), *args.ncf_args]
        trial.set_user_attr("ncf_flags", fixed)  # the best command carries what its trial ran with
        argv = ["--data", args.data, "--checkpoint_dir", folder, "--no_progress",
                "--log_path", os.path.join(folder, "log.json"), *fixed, *flags_of(params)]

        def on_epoch(record):
            trial.report(record["valid_hr"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            new_trial_folder(folder)
            summary = run_trial(ncf, trial, argv, folder, on_epoch, sigterm)
        except UserError as error:  # report_failure says it; the search goes on
            trial.set_user_attr("error", str(error))
            raise
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


# -- the report ----------------------------------------------------------------------------------------------


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


def report_best(study, args, study_dir):
    best = study.best_trial
    fixed = best.user_attrs["ncf_flags"]
    command = shlex.join(["python", "ncf.py", "--data", args.data, *fixed, *flags_of(best.params)])
    record = {CREATED_BY: "tune.py", "study": study.study_name, "trial": best.number, "valid_hr": best.value,
              "test_hr_of_that_trial": best.user_attrs.get("test_hr"), "best_epoch": best.user_attrs.get("best_epoch"),
              "params": best.params, "fixed_flags": fixed, "command": command}
    with owned_file(os.path.join(study_dir, BEST), "--output", is_tune_json, f"a {BEST}") as f:
        f.write(json.dumps(record, indent=1).encode())
    print(f"\nbest trial {best.number}: validation HR {best.value:.4f} (test HR of that trial "
          f"{best.user_attrs.get('test_hr', float('nan')):.4f}, reported, not used to choose)\n{command}")
    print(json.dumps(record))


def plot(study, study_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib, or pass --no_plots") from None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        draws = (optuna_plots.plot_optimization_history, optuna_plots.plot_param_importances)
        for name, draw in zip(PLOTS, draws, strict=True):
            try:
                axes = draw(study)
            except (ValueError, RuntimeError) as err:  # importances need 2+ finished trials that differ
                print(f"no {name}: {err}")
                continue
            path = os.path.join(study_dir, name)
            with owned_file(path, "--output", is_tune_plot, "a plot") as f:
                axes.figure.savefig(f, format="png", dpi=100, bbox_inches="tight", metadata={CREATED_BY: "tune.py"})
            plt.close(axes.figure)
            print(f"wrote {path}")


# -- main ----------------------------------------------------------------------------------------------------


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune.py needs Optuna: pip install -r requirements-tune.txt") from None
    # Optuna would log a failed trial with its traceback; report_failure says it in one line instead.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def open_study(optuna, args, storage, shown, settings):
    """The study, created or continued; its settings recorded or checked; OUTPUT claimed."""
    if args.storage is None:
        claim_output(args.output)  # the database lives in OUTPUT: OUTPUT is tune.py's before it is written
    study = optuna.create_study(study_name=args.study_name, storage=make_storage(optuna, storage),
                                load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=args.seed),
                                pruner=make_pruner(optuna, args.epochs))
    where = f"study {args.study_name} in {shown}"
    check_settings(study, settings, where)
    claim_output(args.output)
    check_trial_folders(os.path.join(args.output, args.study_name), study, where)
    with heartbeat_api(optuna):
        optuna.storages.fail_stale_trials(study)
    return study


@main_guard
def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    optuna = import_optuna()
    import ncf

    fixed = parse_ncf(ncf, args.ncf_args, "the ncf.py flags after --")
    space = load_space(args.space, ncf, args.ncf_args)
    storage = args.storage or f"sqlite:///{os.path.abspath(os.path.join(args.output, DEFAULT_DB))}"
    shown = check_storage(storage, given=args.storage is not None)
    study_dir = check_output(args)
    settings = study_settings(args.epochs, space, fixed, check_data(args.data))
    # SIGTERM ends the search as Ctrl-C does (a trial then running stops after its epoch, and is failed).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    study = open_study(optuna, args, storage, shown, settings)
    enqueue_defaults(study, space, fixed)
    done = sum(t.state.is_finished() for t in study.trials)
    if done:
        print(f"study {args.study_name} in {shown}: {done} trials finished, continuing to {args.trials}")
    try:
        if args.trials > done:
            with SigtermWatch() as sigterm:
                study.optimize(make_objective(args, space, study_dir, sigterm), n_trials=args.trials - done,
                               timeout=args.timeout, catch=(UserError,), callbacks=[report_failure],
                               show_progress_bar=sys.stderr.isatty())
    finally:
        print_table(study)
    if not any(t.value is not None for t in study.trials):
        raise UserError(f"no trial finished: see {os.path.join(study_dir, 'trials', 'N', TRIAL_LOG)} and widen or "
                        "fix the search space")
    report_best(study, args, study_dir)
    if not args.no_plots:
        plot(study, study_dir)


if __name__ == "__main__":
    main()
