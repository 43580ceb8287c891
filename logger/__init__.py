"""Run logging: console lines and JSON lines (`--log_path`), written by global rank 0 only.

This is the one place that knows the metric names and units. Each JSON line is an object with an
"event" field: "config" (once, at start), "epoch" (once per epoch), "summary" (once, at the end) or
"test" (`--mode test`).

Each record also carries the keys NVIDIA's recipe logs (DLLogger), with the recipe's meanings, so that a
recipe user's log readers work unchanged: see RECIPE_KEYS. Epochs stay 1-based here, in the console and
the "epoch" field; "step" holds the recipe's 0-based epoch.
"""
import json
import sys
import time

from cli import open_owned_for_append

# The ranking metrics (metrics.METRICS) by name -> printed label. Each is logged as NAME (sampled, test),
# valid_NAME (sampled, validation split) and full_NAME (full ranking).
METRIC_LABELS = {"hr": "HR@{k}", "ndcg": "NDCG@{k}", "mrr": "MRR@{k}"}
METRIC_SPLITS = {"valid_": "valid ", "": "", "full_": "full "}  # key prefix -> label prefix
# JSON key -> (console label, format). Keys absent from a record are not printed.
_FIELDS = {
    "epoch": ("epoch", "{:d}"),
    "loss": ("loss", "{:.4f}"),
    "eval_loss": ("eval loss", "{:.4f}"),
    **{prefix + name: (label_prefix + label, "{:.4f}") for prefix, label_prefix in METRIC_SPLITS.items()
       for name, label in METRIC_LABELS.items()},
    "train_time_s": ("train time", "{:.2f} s"),
    "train_throughput": ("train", "{:,.0f} samples/s"),
    "eval_time_s": ("eval time", "{:.2f} s"),
    "eval_throughput": ("eval", "{:,.0f} samples/s"),
    "best_hr": ("best HR@{k}", "{:.4f}"),
    "best_epoch": ("at epoch", "{:d}"),
    "best_valid_hr": ("its valid HR@{k}", "{:.4f}"),
    "selected_by": ("chosen by", "{}"),
    "time_to_target_s": ("time to target", "{:.2f} s"),
    "time_to_best_model_s": ("time to best model", "{:.2f} s"),
    "best_train_throughput": ("best train", "{:,.0f} samples/s"),
    "best_eval_throughput": ("best eval", "{:,.0f} samples/s"),
    "mean_train_throughput": ("mean train", "{:,.0f} samples/s"),
    "mean_eval_throughput": ("mean eval", "{:,.0f} samples/s"),
}
_NUMBER_FIELDS = ("run_time_s",)  # logged, not printed

# This project's key -> the key NVIDIA's recipe logs the same figure under ({k}: --topk). The recipe's
# time_to_target is the time from start to the end of training, reached or not (its 2019 and newest code
# alike); time_to_target_s here is null unless --threshold was reached, so run_time_s carries it.
RECIPE_KEYS = {
    "loss": "train_loss", "eval_loss": "validation_loss", "hr": "hr@{k}", "train_time_s": "train_epoch_time",
    "eval_time_s": "validation_epoch_time",
    "best_hr": "best_accuracy", "time_to_best_model_s": "time_to_best_model", "run_time_s": "time_to_target",
}


def with_recipe_keys(record, k):
    """`record` plus the recipe's names of its figures, and the recipe's 0-based epoch as "step"."""
    extra = {RECIPE_KEYS[key].format(k=k): value for key, value in record.items() if key in RECIPE_KEYS}
    if "epoch" in record:
        extra["step"] = [record["epoch"] - 1]
    return {**record, **extra}


def format_record(record, k):
    parts = []
    for key, (label, fmt) in _FIELDS.items():
        value = record.get(key)
        if value is not None:
            parts.append(f"{label.format(k=k)} {fmt.format(value)}")
    return " | ".join(parts)


class RunLogger:
    """Prints and appends JSON lines on the main process; does nothing elsewhere."""

    def __init__(self, log_path=None, enabled=True, k=10, stream=None):
        self.enabled = enabled
        self.k = k
        self.stream = stream or sys.stdout
        self.log_path = log_path if enabled else None
        self._file = None  # opened at the first record, so a run that fails early leaves no file

    def info(self, message):
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def write(self, event, **record):
        """Write `record` as one JSON line (not printed)."""
        if self.log_path is None:
            return
        if self._file is None:
            self._file = open_owned_for_append(self.log_path, "--log_path", is_run_log, "a run log")
        self._file.write(json.dumps({"event": event, "time": time.time(), **with_recipe_keys(record, self.k)}) + "\n")

    def log(self, event, **record):
        """Print `record` as one console line and write it as one JSON line."""
        self.write(event, **record)
        self.info(format_record(record, self.k))

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def is_run_log(path):
    """A proof (cli.may_write) that `path` is a log RunLogger wrote: every line one of its records."""
    with open(path, encoding="utf-8") as f:
        return all(record_problem(json.loads(line)) is None for line in f if line.strip())


def read_log(path):
    """All JSON records of a log file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_INTEGER_FIELDS = ("epoch", "best_epoch")
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
               type(None): "null"}


def record_problem(record):
    """Why `record` (one parsed JSON line) is not a log record as RunLogger writes them, or None.

    Checked: an object with a string "event", and every metric field of _FIELDS a number (an integer
    for epochs) or null, so that readers (logger.plot) never meet a string where they plot a number.
    """
    if not isinstance(record, dict):
        return f"is a JSON {_JSON_TYPES.get(type(record), 'value')}, not an object"
    if not isinstance(record.get("event"), str):
        return 'has no "event" field naming its kind'
    for key in (*_FIELDS, *_NUMBER_FIELDS):
        value = record.get(key)
        if value is None:
            continue
        if key == "selected_by":
            if not isinstance(value, str):
                return f'has "{key}": {json.dumps(value)[:40]}, not a string'
            continue
        integer = key in _INTEGER_FIELDS
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return f'has "{key}": {json.dumps(value)[:40]}, not {"an integer" if integer else "a number"}'
    return None

