"""One owner for every write: no command writes, appends to, moves or deletes a path except
through cli.py's helpers, which ask the path's content for proof that this project wrote it first.

The test reads the source, not the behaviour: it walks every module and fails on a call that writes a
path directly. Writes into a file object that cli.atomic_file / cli.owned_file yielded, or into the
temporary folder that cli.staged_folder yielded, go through the owner and are allowed.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWNER = "cli.py"
SOURCES = sorted(p for p in [*ROOT.glob("*.py"), *ROOT.glob("logger/*.py"), *ROOT.glob("benchmarks/*.py")]
                 if p.name != OWNER)
# Calls that write, move or delete the path they are given: (module or None for a method, name) -> which
# argument is the destination.
WRITERS = {
    ("os", "remove"): 0, ("os", "unlink"): 0, ("os", "rename"): 1, ("os", "replace"): 1, ("os", "rmdir"): 0,
    ("os", "removedirs"): 0, ("shutil", "rmtree"): 0, ("shutil", "move"): 1, ("shutil", "copy"): 1,
    ("shutil", "copyfile"): 1, ("shutil", "copy2"): 1, ("shutil", "copytree"): 1,
    ("torch", "save"): 1, ("np", "save"): 0, ("np", "savez"): 0, ("np", "savez_compressed"): 0,
    ("np", "savetxt"): 0, ("json", "dump"): 1, ("pq", "write_table"): 1,
    (None, "savefig"): 0, (None, "to_csv"): 0, (None, "to_parquet"): 0, (None, "write_text"): None,
    (None, "write_bytes"): None, (None, "unlink"): None, (None, "rmdir"): None, (None, "touch"): None,
}
OWNED_HANDLES = {"atomic_file", "owned_file"}  # `with cli.owned_file(...) as f`: writes into f are owned
OWNED_FOLDERS = {"staged_folder"}  # `with cli.staged_folder(...) as tmp`: paths under tmp are owned


def _callee(call):
    """(module, name) of a call: ("os", "remove") for os.remove(...), (None, "savefig") for x.savefig(...)."""
    func = call.func
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        module = func.value.id if isinstance(func.value, ast.Name) else None
        return module, func.attr
    return None, None


def _with_targets(tree):
    """{id(node): (names of owned file objects, names of owned folders or paths) in force at that node}.

    `with owned_file(...) as f` makes f an owned file object; `with staged_folder(...) as tmp` makes tmp an
    owned folder, and so are names later assigned from an expression using it (path = join(tmp, name)),
    and a file opened there (`with open(path, "wb") as f`).
    """
    bound = {}

    def visit(node, handles, folders):
        if isinstance(node, ast.With | ast.AsyncWith):
            handles, folders = set(handles), set(folders)
            for item in node.items:
                call = item.context_expr if isinstance(item.context_expr, ast.Call) else None
                _, name = _callee(call) if call else (None, None)
                if not isinstance(item.optional_vars, ast.Name):
                    continue
                if name in OWNED_HANDLES or (name == "open" and call.args and _names_in(call.args[0]) & folders):
                    handles.add(item.optional_vars.id)
                elif name in OWNED_FOLDERS:
                    folders.add(item.optional_vars.id)
        elif isinstance(node, ast.Assign) and _names_in(node.value) & folders and not isinstance(folders, frozenset):
            folders.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        bound[id(node)] = (handles, folders)
        for child in ast.iter_child_nodes(node):
            visit(child, handles, folders)

    visit(tree, frozenset(), frozenset())
    return bound


def _names_in(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _open_mode(call):
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"


def unowned_writes(path):
    """`file:line call` for every direct write of a path in the module at `path`."""
    tree = ast.parse(path.read_text())
    bound = _with_targets(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        module, name = _callee(node)
        if name == "open" and module is None:
            if not set(_open_mode(node)) & set("wax+"):
                continue
            where = 0
        elif (module, name) in WRITERS or ((None, name) in WRITERS and module not in ("os", "shutil", "torch", "np")):
            where = WRITERS.get((module, name), WRITERS.get((None, name)))
        else:
            continue
        handles, folders = bound[id(node)]
        args = [*node.args, *(k.value for k in node.keywords if k.arg in ("f", "fname", "file", "path", "dst"))]
        destination = args[where] if where is not None and where < len(args) else None
        if destination is not None and ((isinstance(destination, ast.Name) and destination.id in handles)
                                        or _names_in(destination) & folders):
            continue
        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}(...)")
    return found


def test_the_walker_finds_direct_writes(tmp_path):
    """The walker itself: every kind of direct write is found, writes through the owner are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import json, os, shutil, torch\n"
        "open(p, 'w')\nopen(p, mode='a')\nos.remove(p)\nshutil.rmtree(p)\ntorch.save(x, p)\n"
        "json.dump(x, open(p, 'w'))\n"
        "fig.savefig(p)\nopen(p)\n"
        "with owned_file(p, '--x', proof, 'a file') as f:\n    torch.save(x, f)\n    fig.savefig(f)\n"
        "with staged_folder(p, ok, 'export') as tmp:\n    open(os.path.join(tmp, 'a'), 'w')\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = unowned_writes(sample)
    finally:
        ROOT = saved
    assert sorted(line.split()[0] for line in found) == [f"sample.py:{n}" for n in (2, 3, 4, 5, 6, 7, 7, 8)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_write_goes_through_the_owner(path):
    found = unowned_writes(path)
    assert not found, ("these calls write a path without cli.py's owner (cli.owned_file, open_owned_for_append, "
                       "remove_owned, staged_folder, hold_lock): " + "; ".join(found))
