"""Search ncf.py's hyperparameters with Optuna, selecting on the validation split (never on test figures).

    ./prepare_dataset.sh synthetic --validation            # a cache with a validation split
    python tune.py --data data/cache/synthetic-validation --trials 30 --epochs 10 --output runs/tune
    python tune.py --data ... --trials 60 --output runs/tune          # continue the same study to 60 trials
    python tune.py --data ... --space space.json -- --opt_level O0    # own search space; fixed ncf.py flags
    python tune.py --data ... --storage postgresql://tune@db-host/tune --study_name ncf   # on every machine

Each trial trains ncf.py's own training loop in this process with the flags the sampler (TPE, seeded by
--seed) proposes (a new study's first trial: ncf.py's defaults, where the space admits them), reports
the validation HR@k after every epoch, and is pruned when it falls behind the median of earlier trials
at the same epoch (Optuna's MedianPruner). A trial that fails (a diverged
run, a bad combination of flags) is recorded as failed and the search goes on. Its value is the
validation HR@k of its best epoch; the test HR@k of that epoch is recorded beside it, only to report.
Every validation figure is shown with its binomial standard error over the users who have a validation
item, sqrt(p (1 - p) / n).

A search's best trial won on one seed, among many: before a configuration is named, the --confirm_top
leading trials and the defaults' trial are trained again with --confirm_seeds new seeds (the search's
seed + 1, + 2, ...), the leader on their mean validation HR is compared with the defaults seed by seed,
and it is recommended only if the mean paired difference exceeds 2 standard errors (the seeds' spread
and the validation users' binomial error); otherwise the defaults' command is. Test figures are reported,
never used. The runs are the trials of a second study, STUDY_NAME.confirm, in the same storage: the
search's sampler and pruner never see them, and a stopped confirmation continues where it was.

The study is stored in SQLite (OUTPUT/study.db) by default, so a search stopped with Ctrl-C continues
where it was by running the same command again: --trials is the number of finished trials the study
should reach. A study records what its figures mean (the data, --epochs, the fixed ncf.py flags, k, the
space) when it is created, and a continuation that differs is refused, naming the difference. Several
machines share one search by passing the same --storage (a database server's URL, e.g.
postgresql://USER@HOST/DB) and --study_name, each with its own --output: together they run --trials
trials, none twice, then share the confirmation runs; a machine that dies leaves its running trial to be
failed by the others once its heartbeat (--heartbeat) is three beats old. Each study has its folder
OUTPUT/STUDY_NAME: the trials this machine ran (trials/N, confirm/N), and at the end best.json (the
search's best trial, the confirmation and the recommended flags, also printed as a ready ncf.py command)
and plots of the search (optimisation history and parameter importances).

The search space is a JSON object, one entry per searchable ncf.py flag (long name without dashes,
SEARCHABLE below): {"low": A, "high": B} for a number (add "log": true for a log scale) or
{"choices": [...]} (for --layers, strings such as "64 32 16"). DEFAULT_SPACE below is the default.
Every choice and both ends of every range are checked by ncf.py's own parser before the first trial.
"""
import cli  # noqa: I001  (sets the OpenMP wait policy before torch loads)

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shlex
import signal
import sqlite3
import statistics
import sys
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass

from cli import (CREATED_BY, EnvironmentFailure, UserError, check_identity, check_may_write, check_output_path,
                 json_marker, main_guard, open_owned_for_append, owned_file, proven, remove_owned)
from model_config import MODELS

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
    "model": {"choices": list(MODELS)},
}
# Only what changes the model or how it is trained is searchable. Left out on purpose: flags that
# change the measure, not the model (topk, threshold, patience, full_ranking: a search over k picks the
# largest k), the seed (a search over it fits one seed's noise), flags that change speed or memory but
# not the result by design (valid_batch_size, opt_level, amp_dtype, device, save_every): a search would rank
# their noise; and grads_accumulated and accumulate, which multiply the step's batch: search batch_size.
# Fix any of those after --.
SEARCHABLE = ("learning_rate", "batch_size", "beta1", "beta2", "eps", "factors", "layers", "dropout",
              "negative_samples", "weight_decay", "model", "lr_schedule", "warmup_epochs")
# Flags a trial sets itself: refused after --.
RESERVED = {"data", "epochs", "checkpoint_dir", "log_path", "mode", "resume", "load_checkpoint_path",
            "no_progress", "local_rank", "init_gmf", "init_mlp"}
# Fixed flags that change neither the training nor its figures, left out of a study's settings: another
# machine may continue the study on its own device, with an evaluation batch that fits it. Not
# --grads_accumulated: under the recipe's meaning it multiplies the optimizer step's batch.
NOT_SETTINGS = {"device", "valid_batch_size", "save_every"}
SETTINGS_ATTR = "tune_settings"  # the study's user attribute that records them
HEARTBEAT_S, GRACE_S = 60, 180  # a running trial's liveness signal, and how old it may get
BEATS = GRACE_S // HEARTBEAT_S  # --heartbeat S gives a grace of BEATS x S
HEARTBEAT_ATTR = "heartbeat_s"  # the study's user attribute for a --heartbeat given when it was created
DEFAULTS_ATTR = "defaults"  # the user attribute of the trial enqueued with ncf.py's defaults
OUTSIDE_ATTR = "outside_space"  # {flag: ncf.py's default} of that trial's flags whose default the space excludes
SURPLUS_ATTR = "surplus"  # a trial that another worker's made unneeded: it ran nothing and counts for nothing
CONFIRM = ".confirm"  # STUDY_NAME.confirm holds the confirmation runs: no --study_name has a dot
NOISE_SE = 2  # a confirmed win must exceed this many standard errors
SCHEMA_TRIES = 8  # opening a database whose tables other workers are creating at the same moment
SETTLE_S = 10  # how long a worker waits for the machine that is creating the study to record its settings
MARKER = "tune.json"  # its content (created_by), not its name, makes OUTPUT a folder of tune.py's
STUDY_FILE = "study.json"  # in STUDY_NAME/: which study (UID_ATTR) the folder's files are of
UID_ATTR = "uid"
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
    with open(path, encoding="utf-8") as f:
        return f.readline().startswith(TRIAL_LOG_HEAD)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--confirm_top", type=int, default=3,
                   help="leading trials trained again with --confirm_seeds new seeds before one is named (0: none)")
    p.add_argument("--confirm_seeds", type=int, default=3,
                   help="new seeds per confirmed trial and for the defaults' trial (0: no confirmation; else >= 2)")
    p.add_argument("--heartbeat", type=int, default=None,
                   help=f"seconds between a running trial's signs of life; one silent for {BEATS} beats is failed "
                        f"by the other workers (default {HEARTBEAT_S}; fixed when the study is created)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("ncf_args", nargs=argparse.REMAINDER,
                   help="after --: ncf.py flags every trial uses (not searched), e.g. -- --opt_level O0")

    def refuse(message):  # a bad flag is one line, as any other bad input, not a usage dump
        raise UserError(f"{message} (see --help)")

    p.error = refuse
    args = p.parse_args(argv)
    args.ncf_args = args.ncf_args[1:] if args.ncf_args[:1] == ["--"] else args.ncf_args
    return args


def check_flags(args):
    ranks = {name: os.environ[name] for name in ("WORLD_SIZE", "RANK") if os.environ.get(name, "0") not in ("0", "1")}
    if ranks:
        shown = " ".join(f"{name}={value}" for name, value in ranks.items())
        raise UserError(f"{shown} is in the environment, but tune.py runs every trial in its own one process (start "
                        f"it with python, not torchrun): unset {' and '.join(ranks)}")
    for flag, value in (("--trials", args.trials), ("--epochs", args.epochs)):
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserError(f"--timeout is the seconds after which no new trial starts: give a positive number, "
                        f"got {args.timeout}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    for flag, value in (("--confirm_top", args.confirm_top), ("--confirm_seeds", args.confirm_seeds)):
        if not 0 <= value <= 100:
            raise UserError(f"{flag} must be in [0, 100] (0: no confirmation), got {value}")
    if args.confirm_seeds == 1:
        raise UserError("--confirm_seeds 1 gives no spread across seeds to judge a win by: give 2 or more, or 0 "
                        "for no confirmation")
    if args.heartbeat is not None and not 1 <= args.heartbeat <= 3600:
        raise UserError(f"--heartbeat is the seconds between a running trial's signs of life: give 1 to 3600, got "
                        f"{args.heartbeat}")
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
        with open(path, encoding="utf-8") as f:
            space = json.load(f, object_pairs_hook=unique_keys)
    except (OSError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--space {path}: cannot read it as JSON ({reason})") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"--space {path} must be a JSON object with one entry per flag")
    return space


def unique_keys(pairs):
    """A JSON object, refusing a key given twice (json keeps the last silently: which entry did the user mean?)."""
    names = [name for name, _ in pairs]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ValueError(f"the entry {twice!r:.40} is given twice")
    return dict(pairs)


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
    """The trial's flags as {name: value}; `integers` names the flags that take an int. The defaults' trial
    (and its confirmation runs) takes ncf.py's defaults that the space excludes as they are (OUTSIDE_ATTR):
    Optuna would sample them instead, and the "defaults" the winner is compared with would not be."""
    outside = trial.user_attrs.get(OUTSIDE_ATTR, {})
    params = {}
    for name, spec in space.items():
        log = spec.get("log", False)
        if name in outside:
            params[name] = outside[name]
        elif "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif name in integers:
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=log)
        else:  # a float flag's range is continuous even if its ends are written as integers
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=log)
    return params


def trial_flags(trial):
    """The searched flags a trial ran with: its parameters, and for the defaults' trial the defaults the space
    excludes (see suggest)."""
    return {**trial.user_attrs.get(OUTSIDE_ATTR, {}), **trial.params}


def flags_of(params):
    """ncf.py command-line flags for {name: value}."""
    argv = []
    for name, value in params.items():
        argv += [f"--{name}", *str(value).split()] if name == "layers" else [f"--{name}", str(value)]
    return argv


def enqueue_defaults(study, space, defaults):
    """A new study's first trial: ncf.py's defaults (with the fixed flags) for every searched flag. Those the
    space admits are the trial's parameters; the others (the recipe's batch of 2^20 against a space of small
    batches, say) it takes as they are, outside the search (OUTSIDE_ATTR). The search then starts from the
    recipe's setting, and the confirmation compares the winner with exactly it."""
    params, outside = {}, {}
    for name, spec in space.items():
        value = getattr(defaults, name)
        value = " ".join(map(str, value)) if name == "layers" else value
        admitted = value in spec["choices"] if "choices" in spec else spec["low"] <= value <= spec["high"]
        (params if admitted else outside)[name] = value
    study.enqueue_trial(params, user_attrs={DEFAULTS_ATTR: True, OUTSIDE_ATTR: outside})


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

    if given and not url.strip():
        raise UserError("--storage is empty: leave it out (OUTPUT/study.db), or give a database URL")
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
        # A server that does not answer is the environment's failure (exit 1), not a bad flag.
        failure = EnvironmentFailure if isinstance(err, exc.OperationalError) else UserError
        raise failure(f"--storage {shown}: cannot read its tables ({reason}): check the URL, the server and the "
                      "credentials") from None


@contextlib.contextmanager
def heartbeat_api(optuna):
    """Optuna's heartbeat calls, without their warning: "experimental" since Optuna 2.9, and what its
    own docs advise for trials of killed processes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def heartbeat_and_grace(seconds):
    """(heartbeat, grace) in seconds for a --heartbeat (None: the defaults)."""
    return (HEARTBEAT_S, GRACE_S) if seconds is None else (seconds, BEATS * seconds)


def make_storage(optuna, url, heartbeat=None):
    """The study's database, with a heartbeat: a trial whose process was killed (kill -9, a lost machine)
    is marked failed once its heartbeat is a grace period old, instead of staying "running" for ever."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

    beat, grace = heartbeat_and_grace(heartbeat)
    for attempt in range(SCHEMA_TRIES):
        try:
            with heartbeat_api(optuna):
                return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=grace)
        except (SQLAlchemyError, RuntimeError) as err:  # RuntimeError: a schema of another Optuna version
            failure = err
            # Workers started at once on an empty database all create Optuna's tables, and all but one
            # collide ("already exists", a duplicate key: Optuna issue 1092): once the tables are there,
            # opening again finds them. At random moments, so that the collided ones do not collide again.
            collided = isinstance(err, (IntegrityError, ProgrammingError)) or \
                (isinstance(err, OperationalError) and "already exists" in str(err))  # SQLite's collision
            if not collided or attempt + 1 == SCHEMA_TRIES:
                break
            time.sleep(random.uniform(0.2, 1.0))
    reason = str(failure).strip().splitlines()[0][:300] if str(failure).strip() else type(failure).__name__
    raise UserError(f"--storage {make_url(url).render_as_string(hide_password=True)}: cannot open it "
                    f"({reason})") from None


def make_sampler(optuna, seed, trials):
    """TPE, seeded by --seed and the number of trials the study had when this worker opened it: TPE's first
    trials are random draws from its seed, which a continued study would otherwise draw again, running
    the first command's trials a second time."""
    import numpy as np

    if trials:
        seed = int(np.random.SeedSequence([seed, trials]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed)


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
    if fixed.grads_accumulated == 1:  # one batch per step: the two meanings agree, so neither is a setting
        flags["--accumulate"] = None
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
        if ran_trials(study):
            raise UserError(f"{where} has {len(study.trials)} trials but no record of the data, epochs and flags "
                            "they ran with (an older tune.py or another program made it), so new trials cannot be "
                            "ranked with them: start a new study (another --study_name)")
        study.set_user_attr(SETTINGS_ATTR, settings)
    # Read back: of two machines that started one study at once, the one whose record lost finds out here.
    # A study older than --accumulate ran -b split into G micro-batches.
    check_identity({"--accumulate": "split", **study.user_attrs[SETTINGS_ATTR]}, settings, where,
                   "continue it with the settings it was started with, or start a new study (another --study_name)")


def ran_trials(study):
    """Whether any trial of the study has started (an enqueued one waits)."""
    import optuna

    return any(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))


def await_settings(study):
    """Whether an existing study has its settings recorded. A machine creating it now enqueues the defaults'
    trial and then records them, within moments: wait for that (up to SETTLE_S) rather than start it twice."""
    deadline = time.monotonic() + SETTLE_S
    while study.user_attrs.get(SETTINGS_ATTR) is None:
        if ran_trials(study) or time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def start_study(study, heartbeat, space, fixed):
    """A new study (or an empty one whose creator stopped before recording its settings): its --heartbeat
    and the defaults' trial, before its settings are recorded (check_settings), which tells the other
    workers that it is ready."""
    if heartbeat is not None:
        study.set_user_attr(HEARTBEAT_ATTR, heartbeat)
    study.set_user_attr(UID_ATTR, uuid.uuid4().hex)
    if not any(t.user_attrs.get(DEFAULTS_ATTR) for t in study.get_trials(deepcopy=False)):
        enqueue_defaults(study, space, fixed)


def use_study_heartbeat(storage, study, given, where):
    """Every worker of a study beats and waits alike: one that waited for fewer seconds than another beats
    would fail that worker's live trials."""
    recorded = study.user_attrs.get(HEARTBEAT_ATTR)
    if given is not None and given != (recorded or HEARTBEAT_S):
        raise UserError(f"--heartbeat {given}: the workers of {where} signal every {recorded or HEARTBEAT_S} s (set "
                        "when it was created), and a worker that waited for another beat would fail their live "
                        "trials: leave --heartbeat out")
    storage.heartbeat_interval, storage.grace_period = heartbeat_and_grace(recorded)


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
        layout = f"{DEFAULT_DB} (the default --storage), and per study STUDY_NAME/{BEST}, STUDY_NAME/*.png, " \
                 "STUDY_NAME/trials/N/, STUDY_NAME/confirm/N/"
        f.write(json.dumps({CREATED_BY: "tune.py", "layout": layout}, indent=1).encode())


def study_uid(study):
    """What tells this study from another of its name in another storage (both may be study 1 there)."""
    if UID_ATTR in study.user_attrs:
        return study.user_attrs[UID_ATTR]
    first = min((t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start), default=None)
    return f"made before {UID_ATTR}: study {study._study_id}, first trial {first}"  # older studies: the same for all


def claim_study_folder(study_dir, study, where):
    """STUDY_NAME/ holds the files of one study: its STUDY_FILE names it; another study of that name (in
    another storage) is refused before its best.json or trials mix with this one's."""
    marker, uid = os.path.join(study_dir, STUDY_FILE), study_uid(study)
    if os.path.isfile(marker) and proven(is_tune_json, marker):
        with open(marker, encoding="utf-8") as f:
            recorded = json.load(f).get("study_uid")
        if recorded != uid:
            raise UserError(f"{study_dir} holds the files of another study named {study.study_name} (another "
                            f"--storage) than {where}: choose another --output or --study_name")
        return
    with owned_file(marker, "--output", is_tune_json, f"a {STUDY_FILE}") as f:
        f.write(json.dumps({CREATED_BY: "tune.py", "study_uid": uid, "study": where}, indent=1).encode())


def check_trial_folders(study_dir, kind, study, where):
    """STUDY_NAME/KIND (trials, confirm) holds only trials of this study: a folder of a number the study has
    not given out belongs to another study of that name (in another storage), whose files a new trial would
    mix with."""
    trials = os.path.join(study_dir, kind)
    names = os.listdir(trials) if os.path.isdir(trials) else []  # listed first: trials that started are older
    started = {str(t.number) for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"}
    stray = sorted(set(names) - started)
    if stray:
        raise UserError(f"{os.path.join(trials, stray[0])} is no trial of {where} (it has {len(started)} trials that "
                        "started): the folder belongs to another study of that name; choose another --output or "
                        "--study_name")


def check_data(path):
    """The cache's metadata, once it is known to hold a validation split, and the number of users with a
    validation item (what a validation HR is averaged over: its binomial standard error's n)."""
    from dataloading import load_cache

    cache = load_cache(path)
    if not cache.has_validation:
        raise UserError(f"--data {path} has no validation split, and tune.py never selects on test figures: "
                        f"rebuild it with ./prepare_dataset.sh NAME --validation (or convert.py --validation)")
    return cache.metadata, int((cache.valid[:, 1] >= 0).sum())


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
            remove_owned(os.path.join(folder, checkpoint.LAST_CHECKPOINT), checkpoint.is_checkpoint_file)  # large
            if sigterm.arrived():
                raise KeyboardInterrupt  # it wins over the pruning or the failure
            cli.raise_if_interrupted()  # a Ctrl-C that a finaliser swallowed during the trial: so does it


class Surplus(Exception):
    """A trial that another worker made unneeded: it trains nothing, and is failed with SURPLUS_ATTR."""


def train(ncf, trial, args, folder, params, on_epoch, sigterm, seed=None):
    """Train `params` (with `seed`, else the fixed flags' seed) into FOLDER for `trial`; the validation HR@k
    of its best epoch, its test HR@k (only to report) and flags recorded in the trial."""
    fixed = ["-e", str(args.epochs), *args.ncf_args]
    trial.set_user_attr("ncf_flags", fixed)  # the best command carries what its trial ran with
    seeded = [] if seed is None else ["--seed", str(seed)]
    argv = ["--data", args.data, "--checkpoint_dir", folder, "--no_progress", "--log_path",
            os.path.join(folder, "log.json"), *fixed, *flags_of(params), *seeded]
    try:
        new_trial_folder(folder)
        summary = run_trial(ncf, trial, argv, folder, on_epoch, sigterm)
    except UserError as error:  # the failure reporter says it; the search goes on
        trial.set_user_attr("error", str(error))
        raise
    if summary["interrupted"]:  # SIGTERM: the trial stopped early, so its figure is not the flags' own
        raise KeyboardInterrupt
    trial.set_user_attr("test_hr", summary["best_hr"])
    trial.set_user_attr("best_epoch", summary["best_epoch"])
    return summary["best_valid_hr"]


def counted(trials):
    """The trials that count towards --trials: those that started (a killed worker's, failed, too), but not
    the surplus ones."""
    return [t for t in trials if t.state.name != "WAITING" and not t.user_attrs.get(SURPLUS_ATTR)]


def refuse_surplus(trial, limit):
    """The database numbers trials one at a time, so of two workers that each found the last slot free at
    the same moment, the one whose trial came after `limit` counted ones runs nothing (the study ends with
    exactly --trials)."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False)
               if t.number < trial.number and not t.user_attrs.get(SURPLUS_ATTR)]
    if len(earlier) >= limit:
        trial.set_user_attr(SURPLUS_ATTR, True)
        raise Surplus  # and stop_at stops the worker


def stop_at(limit):
    """A callback that stops this worker once the study has `limit` trials that count, the other workers'
    running ones included: several workers together run --trials, not --trials each."""
    def callback(study, trial):
        if len(counted(study.get_trials(deepcopy=False))) >= limit:
            study.stop()

    return callback


def make_objective(search, sigterm):
    import optuna

    import ncf

    integers = {name for name, kind in numeric_flags(ncf).items() if kind is int}

    def objective(trial):
        refuse_surplus(trial, search.args.trials)
        params = suggest(trial, search.space, integers)

        def on_epoch(record):
            trial.report(record["valid_hr"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        folder = os.path.join(search.study_dir, "trials", str(trial.number))
        return train(ncf, trial, search.args, folder, params, on_epoch, sigterm)

    return objective


def failure_reporter(what):
    """A callback: one line for a failed trial (a diverged run, flags ncf.py refuses); the search goes on."""
    def callback(study, trial):
        if trial.state.name == "FAIL" and not trial.user_attrs.get(SURPLUS_ATTR):
            print(f"tune.py: {what} {trial.number} failed: {trial.user_attrs.get('error', 'see its train.log')}",
                  file=sys.stderr)

    return callback


# -- the confirmation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """What the search, its confirmation and its report share, fixed once the study is open."""
    args: argparse.Namespace
    space: dict
    fixed: argparse.Namespace  # ncf.py's flags after --, parsed
    study_dir: str
    users: int  # users with a validation item: the n of every binomial standard error
    shown: str  # the storage's URL, without its password
    deadline: float | None  # the time.monotonic() after which no trial starts (--timeout)
    poll_s: float  # how often to look at other workers' trials

    @property
    def where(self):
        return f"study {self.args.study_name} in {self.shown}"


def time_left(search):
    return None if search.deadline is None else max(0.0, search.deadline - time.monotonic())


def binomial_se(p, n):
    """The standard error of a hit rate p over n users."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def defaults_trial(study):
    """The trial enqueued with ncf.py's defaults (in a study of an earlier tune.py: its first)."""
    trials = study.get_trials(deepcopy=False)
    return next((t for t in trials if t.user_attrs.get(DEFAULTS_ATTR)), trials[0])


def leaders(study, top):
    """The `top` complete trials of highest validation HR, the earlier first on a tie."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    return sorted(done, key=lambda t: (-t.value, t.number))[:top]


def run_key(params, seed):
    """A confirmation run's identity: trials of the same flags share their runs."""
    return json.dumps({**params, "seed": seed}, sort_keys=True)


def run_stands(run):
    """A confirmation run done, being done, or failed for good (ncf.py refused it or it diverged), as opposed
    to one interrupted or whose worker died, which is run again."""
    state = run.state.name
    return not run.user_attrs.get(SURPLUS_ATTR) and (
        state in ("WAITING", "RUNNING", "COMPLETE") or (state == "FAIL" and "error" in run.user_attrs))


def standing_runs(confirmation):
    """{run key: its standing run of lowest number} in the confirmation study."""
    runs = {}
    for run in confirmation.get_trials(deepcopy=False):  # in number order
        if "run" in run.user_attrs and run_stands(run):
            runs.setdefault(run.user_attrs["run"], run)
    return runs


def make_confirm_objective(search, sigterm):
    import ncf

    integers = {name for name, kind in numeric_flags(ncf).items() if kind is int}

    def objective(trial):
        key = trial.user_attrs.get("run")
        # Two workers that planned at once enqueue a run twice; the entry of lower number runs, and its key,
        # written when it was made, is there for the later one to see. No key: no enqueued run was left.
        if key is None or any(run.number < trial.number and run.user_attrs.get("run") == key and run_stands(run)
                              for run in trial.study.get_trials(deepcopy=False)):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise Surplus
        params = suggest(trial, search.space, integers)  # the enqueued values
        seed = trial.suggest_int("seed", 0, 2**32 - 1)
        folder = os.path.join(search.study_dir, "confirm", str(trial.number))
        return train(ncf, trial, search.args, folder, params, None, sigterm, seed)

    return objective


def open_confirmation(optuna, storage, args, settings, shown, create):
    """STUDY_NAME.confirm: the confirmation runs, as trials of their own study (the search's sampler, pruner
    and best trial never see them), made with the search's settings. Without `create`, only checked if it is
    there (before the first trial), and None if not."""
    name, sampler = args.study_name + CONFIRM, optuna.samplers.RandomSampler(seed=0)
    try:
        confirmation = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                           direction="maximize", sampler=sampler) if create else \
            optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:  # load_study's word for a study that is not there
        return None
    where = f"study {name} in {shown}"
    check_settings(confirmation, settings, where)
    check_trial_folders(os.path.join(args.output, args.study_name), "confirm", confirmation, where)
    return confirmation


def wait_for_others(optuna, study, what, search):
    """Until no trial of `study` runs: another worker's ends, or is failed once its heartbeat is too old.
    False if --timeout came first."""
    told = False
    while True:
        with heartbeat_api(optuna):
            optuna.storages.fail_stale_trials(study)
        running = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
        if not running:
            return True
        if time_left(search) == 0:
            return False
        if not told:
            print(f"waiting for {what} {' '.join(map(str, running))}, running on other workers (the trial of a "
                  "command that was killed is failed once its heartbeat is three beats old)")
            told = True
        time.sleep(search.poll_s)


def run_confirmation(optuna, confirmation, plan, search, sigterm):
    """Every run of `plan` ({key: (trial, seed)}) done or failed for good, by this worker or another (the
    runs it lacks are enqueued, then taken one at a time); False if --timeout came first."""
    objective = make_confirm_objective(search, sigterm)
    while True:
        runs = standing_runs(confirmation)
        for key, (trial, seed) in plan.items():
            if key not in runs:
                confirmation.enqueue_trial({**trial.params, "seed": seed},
                                           user_attrs={"run": key, "seed": seed, "of_trial": trial.number,
                                                       OUTSIDE_ATTR: trial.user_attrs.get(OUTSIDE_ATTR, {})})
        runs = standing_runs(confirmation)
        pending = [runs[key] for key in plan if runs[key].state.name in ("WAITING", "RUNNING")]
        if not pending:
            return True
        if time_left(search) == 0:
            return False
        if any(run.state.name == "WAITING" for run in pending):
            confirmation.optimize(objective, n_trials=1, catch=(UserError, Surplus),
                                  callbacks=[failure_reporter("confirmation run")])
        elif not wait_for_others(optuna, confirmation, "confirmation runs", search):
            return False


def confirm(optuna, storage, study, search, settings, sigterm):
    """Train the leading trials and the defaults' trial again with --confirm_seeds new seeds (the search's
    seed + 1, + 2, ...: its own figure chose these trials, so it is left out), sharing the runs with the
    other workers; the record of what they show, or None if --timeout came first."""
    seeds = [(search.fixed.seed + i) % 2**32 for i in range(1, search.args.confirm_seeds + 1)]
    trials = {t.number: t for t in [*leaders(study, search.args.confirm_top), defaults_trial(study)]}
    plan = {run_key(trial_flags(t), seed): (t, seed) for t in trials.values() for seed in seeds}
    confirmation = open_confirmation(optuna, storage, search.args, settings, search.shown, create=True)
    print(f"confirming trials {' '.join(map(str, trials))} with seeds {' '.join(map(str, seeds))} "
          f"({len(plan)} runs, in {confirmation.study_name})")
    if not run_confirmation(optuna, confirmation, plan, search, sigterm):
        return None
    runs = {key: run for key, run in standing_runs(confirmation).items() if run.state.name == "COMPLETE"}
    return confirmation_record(study, runs, seeds, search)


def seed_figures(trial, runs, seeds, users):
    """A trial's confirmation: validation HR per seed (None: failed), their mean and its standard error (the
    seeds' spread, and the users' binomial error, which more seeds do not shrink: every seed is evaluated
    on the same users), and the mean test HR, only to report."""
    done = [runs.get(run_key(trial_flags(trial), seed)) for seed in seeds]
    entry = {"trial": trial.number, "params": trial_flags(trial), "valid_hr": [r.value if r else None for r in done]}
    if all(done):
        values = entry["valid_hr"]
        entry["mean"] = statistics.fmean(values)
        entry["se"] = math.sqrt(statistics.variance(values) / len(values) + binomial_se(entry["mean"], users) ** 2)
        entry["test_hr_mean"] = statistics.fmean(r.user_attrs["test_hr"] for r in done)
    return entry


def paired_comparison(winner, defaults, users):
    """The winner against the defaults seed by seed: the mean difference, its standard error (the spread of
    the differences, and both figures' binomial error over the users, taken as independent, which errs
    on the side of caution: two models' hits on the same users agree more often than not), the seeds on
    which the winner was better, and whether the mean exceeds NOISE_SE standard errors."""
    differences = [w - d for w, d in zip(winner["valid_hr"], defaults["valid_hr"], strict=True)]
    n = len(differences)
    users_var = binomial_se(winner["mean"], users) ** 2 + binomial_se(defaults["mean"], users) ** 2
    mean = statistics.fmean(differences)
    se = math.sqrt(statistics.variance(differences) / n + users_var)
    return {"differences": differences, "mean": mean, "se": se, "better_on": sum(d > 0 for d in differences),
            "seeds": n, "beats": mean > NOISE_SE * se}


def confirmation_record(study, runs, seeds, search):
    """What the confirmation shows, with the trial it recommends and why, in one plain sentence."""
    users = search.users
    defaults = seed_figures(defaults_trial(study), runs, seeds, users)
    candidates = [seed_figures(t, runs, seeds, users) for t in leaders(study, search.args.confirm_top)]
    finished = [c for c in candidates if "mean" in c]
    record = {"seeds": seeds, "users": users, "candidates": candidates, "defaults": defaults, "winner": None,
              "paired": None, "beats_defaults": False, "recommended": defaults["trial"]}
    if not finished:
        record["verdict"] = (f"no leading trial finished every confirmation run (see {search.study_dir}/confirm/N/"
                             f"{TRIAL_LOG}): use ncf.py's defaults")
        return record
    winner = max(finished, key=lambda c: (c["mean"], c["trial"] == defaults["trial"], -c["trial"]))
    record["winner"] = winner["trial"]
    if winner["trial"] == defaults["trial"]:
        record["verdict"] = (f"ncf.py's defaults (trial {winner['trial']}) lead the confirmation, validation HR "
                             f"{winner['mean']:.4f} ± {winner['se']:.4f} over {len(seeds)} new seeds: use them")
    elif "mean" not in defaults:
        failed = [s for s, v in zip(seeds, defaults["valid_hr"], strict=True) if v is None]
        record.update(beats_defaults=True, recommended=winner["trial"],
                      verdict=f"ncf.py's defaults failed with seed(s) {' '.join(map(str, failed))}; trial "
                              f"{winner['trial']} did not: use its flags")
    else:
        paired = record["paired"] = paired_comparison(winner, defaults, users)
        record.update(beats_defaults=paired["beats"], recommended=winner["trial"] if paired["beats"] else
                      defaults["trial"], verdict=verdict(winner, defaults, paired))
    return record


def verdict(winner, defaults, paired):
    figures = (f"validation HR {winner['mean']:.4f} against the defaults' {defaults['mean']:.4f}, mean paired "
               f"difference {paired['mean']:+.4f} ± {paired['se']:.4f} over {paired['seeds']} new seeds, better on "
               f"{paired['better_on']} of {paired['seeds']}")
    if paired["beats"]:
        return (f"trial {winner['trial']} beats ncf.py's defaults beyond noise ({figures}; more than {NOISE_SE} "
                "standard errors): use its flags")
    return (f"trial {winner['trial']} does not beat ncf.py's defaults beyond noise ({figures}; not more than "
            f"{NOISE_SE} standard errors): the search found no real improvement, use the defaults")


# -- the report ----------------------------------------------------------------------------------------------


def print_table(study, users):
    names = sorted({name for t in study.trials for name in trial_flags(t)})
    print(f"{'trial':>5} {'state':>8} {'valid HR ± SE':>15} {'test HR':>8}  " + "  ".join(names))
    for t in study.trials:
        value = f"{t.value:.4f} ± {binomial_se(t.value, users):.4f}" if t.value is not None else "-"
        test = t.user_attrs.get("test_hr")
        flags = trial_flags(t)
        params = "  ".join(f"{flags[n]:.3g}" if isinstance(flags.get(n), float) else str(flags.get(n, "-"))
                           for n in names)
        state = SURPLUS_ATTR if t.user_attrs.get(SURPLUS_ATTR) else \
            "done" if t.state.name == "COMPLETE" else t.state.name.lower()
        print(f"{t.number:>5} {state:>8} {value:>15} {f'{test:.4f}' if test is not None else '-':>8}  {params}")


def print_confirmation(record):
    """The confirmation runs' table, then the comparison with the defaults."""
    seeds = record["seeds"]
    print(f"\nconfirmation: validation HR with new seeds (the search's own figure, which chose these trials, is "
          f"left out); SE: the seeds' spread and the binomial error over {record['users']} users")
    print(f"{'trial':>6} " + " ".join(f"{f'seed {s}':>8}" for s in seeds) + f" {'mean ± SE':>17} {'test HR':>8}")
    rows = {c["trial"]: c for c in [*record["candidates"], record["defaults"]]}
    for trial, c in rows.items():
        mark = "*" if trial == record["defaults"]["trial"] else " "
        values = " ".join(f"{v:>8.4f}" if v is not None else f"{'failed':>8}" for v in c["valid_hr"])
        mean = f"{c['mean']:.4f} ± {c['se']:.4f}" if "mean" in c else "-"
        test = f"{c['test_hr_mean']:.4f}" if "mean" in c else "-"
        print(f"{trial:>5}{mark} {values} {mean:>17} {test:>8}")
    print("(* ncf.py's defaults; test HR: the mean over the seeds, reported, never used to choose)")
    if record["paired"]:
        print(f"trial {record['winner']} - defaults, seed by seed: "
              + " ".join(f"{d:+.4f}" for d in record["paired"]["differences"]))


def command_of(trial, data):
    flags = [*trial.user_attrs["ncf_flags"], *flags_of(trial_flags(trial))]
    return shlex.join(["python", "ncf.py", "--data", data, *flags])


def report_best(study, search, confirmation, unconfirmed):
    """best.json and the closing lines: the search's best trial with its standard error, the confirmation
    (None: `unconfirmed` says why) and the command it recommends."""
    best, users = study.best_trial, search.users
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = trials[confirmation["recommended"]] if confirmation else best
    why = confirmation["verdict"] if confirmation else unconfirmed
    command = command_of(chosen, search.args.data)
    se = binomial_se(best.value, users)
    record = {CREATED_BY: "tune.py", "study": study.study_name, "trial": best.number, "valid_hr": best.value,
              "valid_hr_se": se, "valid_users": users, "test_hr_of_that_trial": best.user_attrs.get("test_hr"),
              "best_epoch": best.user_attrs.get("best_epoch"), "params": trial_flags(best),
              "fixed_flags": best.user_attrs["ncf_flags"], "confirmation": confirmation,
              "recommended": {"trial": chosen.number, "params": trial_flags(chosen), "why": why}, "command": command}
    with owned_file(os.path.join(search.study_dir, BEST), "--output", is_tune_json, f"a {BEST}") as f:
        f.write(json.dumps(record, indent=1).encode())
    if confirmation:
        print_confirmation(confirmation)
    print(f"\nbest trial of the search {best.number}: validation HR {best.value:.4f} ± {se:.4f} (binomial SE over "
          f"{users} users; test HR of that trial {best.user_attrs.get('test_hr', float('nan')):.4f}, reported, not "
          f"used to choose)\n{why}\n{command}")
    print(json.dumps(record))


def plot(study, study_dir):
    """The study's optimization history and parameter importances as PNGs in STUDY_DIR, the objective named
    for what it is (Optuna's "Objective Value" would not say that it is the validation HR@k)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib, or pass --no_plots") from None

    objective = f"validation HR@{study.user_attrs.get(SETTINGS_ATTR, {}).get('--topk', 10)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        draws = (optuna_plots.plot_optimization_history, optuna_plots.plot_param_importances)
        for name, draw in zip(PLOTS, draws, strict=True):
            try:
                axes = draw(study, target_name=objective)
            except (ValueError, RuntimeError) as err:  # importances need 2+ finished trials that differ
                print(f"no {name}: {err}")
                continue
            if draw is optuna_plots.plot_optimization_history:
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are numbered, not measured
                axes.set_title(f"{objective} of each trial of study {study.study_name}")
            else:
                axes.set_title(f"hyperparameter importances for the {objective} of study {study.study_name}",
                               loc="left")
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


def open_study(optuna, args, storage, settings, shown, space, fixed):
    """The study, created (the defaults' trial enqueued, then its settings recorded) or continued (its
    settings checked; waiting for a machine that is creating it now); the heartbeat all its workers use;
    OUTPUT claimed. Returns the study and its storage."""
    if args.storage is None:
        claim_output(args.output)  # the database lives in OUTPUT: OUTPUT is tune.py's before it is written
    rdb = make_storage(optuna, storage, args.heartbeat)
    opened = {"study_name": args.study_name, "storage": rdb, "sampler": make_sampler(optuna, args.seed, 0),
              "pruner": make_pruner(optuna, args.epochs)}
    where = f"study {args.study_name} in {shown}"
    try:  # not load_if_exists: of several machines started at once, exactly one creates the study
        study, ready = optuna.create_study(direction="maximize", **opened), False
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**opened)
        study.sampler = make_sampler(optuna, args.seed, len(study.get_trials(deepcopy=False)))
        ready = await_settings(study)
    if not ready and not ran_trials(study):
        start_study(study, args.heartbeat, space, fixed)
    check_settings(study, settings, where)
    use_study_heartbeat(rdb, study, args.heartbeat, where)
    claim_output(args.output)
    claim_study_folder(os.path.join(args.output, args.study_name), study, where)
    check_trial_folders(os.path.join(args.output, args.study_name), "trials", study, where)
    open_confirmation(optuna, rdb, args, settings, shown, create=False)  # its runs, if any, are of this search
    with heartbeat_api(optuna):
        optuna.storages.fail_stale_trials(study)
    return study, rdb


def search_trials(study, search, sigterm):
    """This worker's share of the study's trials; whether the study has its --trials (the other workers'
    running trials included)."""
    args = search.args
    done = sum(t.state.is_finished() for t in counted(study.get_trials(deepcopy=False)))
    if done:
        print(f"{search.where}: {done} trials finished, continuing to {args.trials}")
    if len(counted(study.get_trials(deepcopy=False))) < args.trials:
        study.optimize(make_objective(search, sigterm), n_trials=args.trials - done, timeout=time_left(search),
                       catch=(UserError, Surplus), callbacks=[failure_reporter("trial"), stop_at(args.trials)],
                       show_progress_bar=sys.stderr.isatty())
    return len(counted(study.get_trials(deepcopy=False))) >= args.trials


@main_guard
def main(argv=None):
    try:
        run(argv)
    except UserError:
        raise
    except Exception as err:  # only the database's failures become a line; anything else stays a traceback
        cause = storage_failure(err)
        if cause is None:
            raise
        raise EnvironmentFailure(f"the study's database failed ({cause}); a trial it was recording stays running "
                                 f"until its heartbeat is old: run the same command again") from None


def storage_failure(err):
    """The database error behind `err`, as text, or None: Optuna wraps it (StorageInternalError), and may
    fail again while handling it (a locked SQLite file under SIGTERM ended in its AssertionError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlite3.OperationalError) or type(err).__name__ in ("StorageInternalError",
                                                                                "OperationalError"):
            return str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        err = err.__cause__ or err.__context__
    return None


def run(argv=None):
    """What `python tune.py ARGS` does."""
    args = parse_args(argv)
    check_flags(args)
    optuna = import_optuna()
    import ncf

    fixed = parse_ncf(ncf, args.ncf_args, "the ncf.py flags after --")
    space = load_space(args.space, ncf, args.ncf_args)
    storage = args.storage if args.storage is not None else \
        f"sqlite:///{os.path.abspath(os.path.join(args.output, DEFAULT_DB))}"
    shown = check_storage(storage, given=args.storage is not None)
    study_dir = check_output(args)
    metadata, users = check_data(args.data)
    settings = study_settings(args.epochs, space, fixed, metadata)
    study, rdb = open_study(optuna, args, storage, settings, shown, space, fixed)
    search = Search(args, space, fixed, study_dir, users, shown,
                    None if args.timeout is None else time.monotonic() + args.timeout,
                    min(10, rdb.heartbeat_interval))
    confirmation, unconfirmed = None, "unconfirmed (--confirm_top 0 or --confirm_seeds 0): chosen on one seed"
    confirming = bool(args.confirm_top and args.confirm_seeds)
    with SigtermWatch() as sigterm:
        try:
            complete = search_trials(study, search, sigterm)
            if complete and confirming:  # the confirmation picks from every trial's last state: so does the table
                complete = wait_for_others(optuna, study, "trials", search)
        finally:
            print_table(study, users)
        if not any(t.value is not None for t in study.trials):
            raise UserError(f"no trial finished: see {os.path.join(study_dir, 'trials', 'N', TRIAL_LOG)} and widen "
                            "or fix the search space")
        if confirming:
            confirmation = confirm(optuna, rdb, study, search, settings, sigterm) if complete else None
            unconfirmed = f"unconfirmed: --timeout came before the {'search' if not complete else 'confirmation'} " \
                          "ended; run the same command again to finish it"
    report_best(study, search, confirmation, unconfirmed)
    if not args.no_plots:
        plot(study, study_dir)


if __name__ == "__main__":
    main()
