"""Every text file and pipe the project reads or writes is UTF-8, whatever the user's locale.

Python's default text encoding is the locale's: under a Latin-1 locale a file written elsewhere would be
read differently, and `python -X warn_default_encoding -W error::EncodingWarning ncf.py` failed in
cache_format.py. The test reads the source: every text-mode open(), Path.read_text/write_text and text
subprocess names its encoding.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("logger/*.py"), *ROOT.glob("benchmarks/*.py")])
SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}


def _name(call):
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _is_os_open(call):  # os.open works on file descriptors: no text, no encoding
    return isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", None) == "os" and \
        call.func.attr == "open"


def _binary(call):
    mode = next((kw.value for kw in call.keywords if kw.arg == "mode"), call.args[1] if len(call.args) > 1 else None)
    return isinstance(mode, ast.Constant) and "b" in str(mode.value)


def text_without_encoding(source):
    """The calls in `source` that open text (a file or a subprocess's pipes) in the locale's encoding."""
    found = []
    for call in ast.walk(ast.parse(source)):
        if not isinstance(call, ast.Call):
            continue
        name, keywords = _name(call), {kw.arg for kw in call.keywords}
        if "encoding" in keywords:
            continue
        opens_text = name in ("open", "fdopen") and not _is_os_open(call) and not _binary(call)
        path_text = name in ("read_text", "write_text")
        subprocess_text = name in SUBPROCESS_CALLS and keywords & {"text", "universal_newlines"}
        if opens_text or path_text or subprocess_text:
            found.append(f"line {call.lineno}: {ast.unparse(call)[:80]}")
    return found


@pytest.mark.parametrize("source, found", [
    ("open(p)", 1), ("open(p, 'w')", 1), ("open(p, 'rb')", 0), ("open(p, mode='ab')", 0), ("os.open(p, 0)", 0),
    ("open(p, encoding='utf-8')", 0), ("p.read_text()", 1), ("p.write_text(s, encoding='utf-8')", 0),
    ("subprocess.run(c, text=True)", 1), ("subprocess.run(c, capture_output=True)", 0),
    ("subprocess.Popen(c, encoding='utf-8')", 0), ("os.fdopen(fd, 'a')", 1),
])
def test_the_walker_finds_text_in_the_locales_encoding(source, found):
    assert len(text_without_encoding(source)) == found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_text_file_and_pipe_is_utf8(path):
    assert text_without_encoding(path.read_text(encoding="utf-8")) == []
