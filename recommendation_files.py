"""Recommendation files: what `inference.py recommend --output FILE.csv|FILE.parquet` writes (serving.py).

One row per recommendation (COLUMNS: original user id, rank from 1, original item id, probability), the format
from the suffix, each file with proof that this command wrote it, so that it alone is ever replaced:
- Parquet carries the proof in its own key-value metadata ("created_by", and "recommendations": a JSON
  description of the model, data, k and users). pyarrow is an optional extra, loaded only here.
- A CSV carries it in a manifest beside it, FILE.csv.manifest.json (created_by, the description, and the CSV's
  size and SHA-256), so that the CSV itself stays plain rows under one header line, which every loader reads
  (a comment line would break many, from databases' COPY to spreadsheets).
Both are written through cli.owned_file: a temporary beside the file, renamed into place once complete.
"""
import contextlib
import importlib
import json
import os

import numpy as np

import cli
from cache_format import file_record
from cli import UserError, check_may_write, json_marker, owned_file

CREATED_BY = "inference.py recommend"
FORMATS = (".csv", ".parquet")
COLUMNS = ("user", "rank", "item", "score")
PARQUET_TYPES = {"user": np.int64, "rank": np.int32, "item": np.int64, "score": np.float64}
MANIFEST_SUFFIX = ".manifest.json"  # a CSV's proof and description, beside it: recs.csv.manifest.json


def output_format(path):
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise UserError(f"--output {path}: the format follows the suffix, which must be .csv or .parquet: name "
                        f"the file e.g. {os.path.splitext(path)[0]}.parquet")
    return suffix


def pyarrow():
    """(pyarrow, pyarrow.parquet), loaded only for a Parquet file: an optional extra."""
    try:
        return importlib.import_module("pyarrow"), importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise UserError("--output FILE.parquet needs the optional package pyarrow, which is not installed: pip "
                        "install -r requirements-export.txt (or pip install pyarrow), or write FILE.csv") from None


def is_our_parquet(path):
    """A proof: the Parquet file's key-value metadata says this command wrote it."""
    metadata = pyarrow()[1].read_metadata(path).metadata or {}
    return metadata.get(b"created_by") == CREATED_BY.encode()


def csv_manifest(path):
    return path + MANIFEST_SUFFIX


def is_our_csv(path):
    """A proof: the manifest beside the CSV is ours and records the CSV's size and SHA-256 (or the previous
    CSV's, which it replaces: an interruption between the two renames leaves that one in place)."""
    with open(csv_manifest(path), encoding="utf-8") as f:
        manifest = json.load(f)
    return manifest.get("created_by") == CREATED_BY and file_record(path) in (manifest["file"],
                                                                              manifest.get("replaces"))


def check_output(path):
    """Refuse, before any work, an --output of an unknown format, one that cannot be written, or a file there
    (or a CSV's manifest) that this command did not write; Parquet needs pyarrow."""
    cli.check_output_path(path, "--output")  # a folder there is named as such, whatever its name
    if output_format(path) == ".parquet":
        pyarrow()
        check_may_write(path, "--output", is_our_parquet, "a recommendations file")
    else:
        check_may_write(path, "--output", is_our_csv, "a recommendations file")
        check_may_write(csv_manifest(path), "--output", json_marker(CREATED_BY), "a recommendations manifest")


@contextlib.contextmanager
def parquet_rows(path, description):
    """Yield write(rows): each call one row group. The file appears, complete, only when the block ends."""
    pa, pq = pyarrow()
    schema = pa.schema([(name, pa.from_numpy_dtype(dtype)) for name, dtype in PARQUET_TYPES.items()],
                       metadata={"created_by": CREATED_BY, "recommendations": json.dumps(description)})

    def table(rows):
        # Arrays made from their buffers: pa.array would import pandas (to look for pandas types), which a
        # serving machine need not have nor load.
        columns = [np.ascontiguousarray(rows[name], dtype=dtype) for name, dtype in PARQUET_TYPES.items()]
        return pa.Table.from_arrays([pa.Array.from_buffers(field.type, len(values), [None, pa.py_buffer(values)])
                                     for field, values in zip(schema, columns, strict=True)], schema=schema)

    with owned_file(path, "--output", is_our_parquet, "a recommendations file") as f:
        writer = pq.ParquetWriter(f, schema)
        try:
            yield lambda rows: writer.write_table(table(rows))
        finally:
            writer.close()  # the footer, with the metadata (after an error too: owned_file then removes it all)


@contextlib.contextmanager
def csv_rows(path, description):
    """Yield write(rows); the CSV and then its manifest appear, complete, only when the block ends."""
    previous = file_record(path) if os.path.isfile(path) and os.path.getsize(path) else None
    with owned_file(path, "--output", is_our_csv, "a recommendations file") as f:
        f.write((",".join(COLUMNS) + "\n").encode())
        written = 0

        def write(rows):
            nonlocal written
            columns = [rows[name].tolist() for name in COLUMNS]
            # repr: the shortest text that reads back as the same float64, as --json prints it
            f.write("".join(f"{u},{r},{i},{s!r}\n" for u, r, i, s in zip(*columns, strict=True)).encode())
            written += len(columns[0])

        yield write
        f.flush()
        # The manifest is renamed into place before the CSV and names both the new CSV and the one it
        # replaces, so whenever an interruption falls, the CSV in place is provably ours.
        manifest = {"created_by": CREATED_BY, **description, "rows": written, "file": file_record(f.name),
                    "replaces": previous}
        with owned_file(csv_manifest(path), "--output", json_marker(CREATED_BY), "a recommendations manifest") as m:
            m.write(json.dumps(manifest, indent=1).encode())


WRITERS = {".csv": csv_rows, ".parquet": parquet_rows}


def writer(path, description):
    """The context manager that writes `path` in the format of its suffix (see check_output, called before)."""
    for stale in (path, csv_manifest(path)):
        cli.remove_stale_temporaries(stale)  # what a killed run left: PATH.tmp-PID of a dead PID
    return WRITERS[output_format(path)](path, description)
