"""A cache is checked when loaded: checksums, format version, id ranges and order; the fix
each refusal suggests really repairs it (convert.py replaces the damaged cache, prepare_dataset.sh
rebuilds it instead of calling it complete)."""
import json
import shutil

import pytest
import torch
from helpers import make_tiny_cache
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convert
from cache_format import FORMAT_VERSION, TENSOR_FILES, file_record
from cli import UserError
from dataloading import load_cache


@pytest.fixture(scope="module")
def pristine(tiny_cache):
    """The tiny cache (300 users x 200 items) and the ratings it was converted from."""
    return tiny_cache, tiny_cache.parent / "ratings.csv"


@pytest.fixture
def cache(pristine, tmp_path):
    """A fresh copy of the tiny cache, to damage."""
    return shutil.copytree(pristine[0], tmp_path / "cache")


def metadata_of(folder):
    return json.loads((folder / "metadata.json").read_text())


def write_metadata(folder, metadata):
    (folder / "metadata.json").write_text(json.dumps(metadata))


def rerecord(folder):
    """Record the files' current checksums, as if the damage had been done before convert finished:
    only the loader's own checks (ranges, order) can then see it."""
    metadata = metadata_of(folder)
    metadata["files"] = {name: file_record(folder / name) for name in TENSOR_FILES}
    write_metadata(folder, metadata)


def edit_tensor(folder, name, edit, keep_checksums=False):
    tensor = torch.load(folder / name, weights_only=True)
    edit(tensor)
    torch.save(tensor, folder / name)
    if keep_checksums:
        rerecord(folder)


def flip_byte(folder):
    """One bit of one item id: the file still loads, has the same size, and every id is in range."""
    path = folder / "train_ratings.pt"
    data = bytearray(path.read_bytes())
    storage = data.find(torch.load(path, weights_only=True).numpy().tobytes())
    data[storage + 4 * 101] ^= 0x01  # the low byte of row 50's item
    path.write_bytes(bytes(data))


def swap_negatives(folder, other):
    shutil.copy(other / "test_negatives.pt", folder / "test_negatives.pt")


def old_format(folder):
    metadata = metadata_of(folder)
    del metadata["files"]
    metadata["format_version"] = 1
    write_metadata(folder, metadata)


def no_checksums(folder):
    metadata = metadata_of(folder)
    del metadata["files"]
    write_metadata(folder, metadata)


def bad_count_type(folder):
    metadata = metadata_of(folder)
    metadata["num_items"] = "200"
    write_metadata(folder, metadata)


def item_out_of_range(folder):
    edit_tensor(folder, "train_ratings.pt", lambda t: t[5, 1].fill_(10**6), keep_checksums=True)


def user_out_of_range(folder):
    edit_tensor(folder, "train_ratings.pt", lambda t: t[-1, 0].fill_(-1), keep_checksums=True)


def swap_rows(first, second):
    def edit(tensor):
        tensor[[first, second]] = tensor[[second, first]].clone()
    return edit


def unsorted_train(folder):
    edit_tensor(folder, "train_ratings.pt", swap_rows(0, 1), keep_checksums=True)


def repeated_pair(folder):
    edit_tensor(folder, "train_ratings.pt", lambda t: t[1].copy_(t[0].clone()), keep_checksums=True)


def swap_test_rows(folder):
    edit_tensor(folder, "test_ratings.pt", swap_rows(3, 4), keep_checksums=True)


def negative_out_of_range(folder):
    edit_tensor(folder, "test_negatives.pt", lambda t: t[7, 3].fill_(200), keep_checksums=True)


def float_ids(folder):
    path = folder / "item_ids.pt"
    torch.save(torch.load(path, weights_only=True).double(), path)
    rerecord(folder)


# (damage, words the error must hold)
DAMAGES = {
    "flipped byte": (flip_byte, ["train_ratings.pt", "SHA-256"]),
    "truncated file": (lambda f: (f / "test_ratings.pt").write_bytes((f / "test_ratings.pt").read_bytes()[:-9]),
                       ["test_ratings.pt"]),
    "file of another cache": (None, ["test_negatives.pt", "SHA-256"]),
    "old format": (old_format, ["format version 1", f"version {FORMAT_VERSION}"]),
    "no checksums": (no_checksums, ["checksums"]),
    "count of the wrong type": (bad_count_type, ["num_items", "'200'"]),
    "item out of range": (item_out_of_range, ["train_ratings.pt", "item ids outside 0..199"]),
    "user out of range": (user_out_of_range, ["train_ratings.pt", "user ids outside 0..299"]),
    "unsorted training pairs": (unsorted_train, ["train_ratings.pt", "not sorted"]),
    "repeated training pair": (repeated_pair, ["train_ratings.pt", "repeat"]),
    "test rows out of order": (swap_test_rows, ["test_ratings.pt", "users 0..U-1 in order"]),
    "negative out of range": (negative_out_of_range, ["test_negatives.pt", "item ids outside"]),
    "float ids": (float_ids, ["item_ids.pt", "not integer"]),
}


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory):
    """Same shape as the tiny cache, other seed: its files are plausible but not ours."""
    return make_tiny_cache(tmp_path_factory.mktemp("other"), seed=1)


def damage(case, folder, other_cache):
    action, _ = DAMAGES[case]
    if action is None:
        swap_negatives(folder, other_cache)
    else:
        action(folder)


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_a_damaged_cache_is_refused_naming_the_file_and_the_fix(cache, other_cache, case):
    damage(case, cache, other_cache)
    with pytest.raises(UserError) as error:
        load_cache(str(cache))
    message = str(error.value)
    assert "\n" not in message
    for word in [*DAMAGES[case][1], "prepare_dataset.sh", f"convert.py --path RATINGS --output {cache}"]:
        assert word in message, (word, message)


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_the_suggested_convert_command_repairs_it(pristine, cache, other_cache, case, capsys):
    damage(case, cache, other_cache)
    convert.main(["--path", str(pristine[1]), "--output", str(cache), "--negatives", "50", "--seed", "0",
                  "--no_progress"])
    repaired = load_cache(str(cache))
    good = load_cache(str(pristine[0]))
    for name in ("train", "test", "test_negatives", "user_ids", "item_ids"):
        assert torch.equal(getattr(repaired, name), getattr(good, name)), name


def test_a_fresh_cache_loads_and_passes_check(pristine, capsys):
    cache = load_cache(str(pristine[0]))
    assert cache.metadata["format_version"] == FORMAT_VERSION
    assert set(cache.metadata["files"]) == set(TENSOR_FILES)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--check", str(pristine[0])])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("case, reason", [
    ("flipped byte", "SHA-256"),
    ("file of another cache", "SHA-256"),
    ("truncated file", "bytes"),
    ("old format", "format version 1"),
    ("no checksums", "checksums"),
    ("item out of range", "item ids outside 0..199"),  # checksums updated to the edit: the loader's checks
])
def test_check_says_an_old_or_damaged_cache_is_not_complete(cache, other_cache, capsys, case, reason):
    """prepare_dataset.sh trusts `convert.py --check`: it must see what load_cache refuses."""
    damage(case, cache, other_cache)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--check", str(cache)])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and reason in out[0], out


def test_check_sees_a_missing_file(cache, capsys):
    (cache / "user_ids.pt").unlink()
    assert not convert.cache_is_complete(cache)
    assert "user_ids.pt is missing" in convert.cache_problem(cache)


def test_a_folder_convert_did_not_write_gets_advice_that_works(cache, pristine):
    """Without metadata.json nothing proves convert.py wrote the folder, so convert.py refuses to
    replace it, and the loader says to move it away first rather than suggest a command that fails."""
    (cache / "metadata.json").unlink()
    with pytest.raises(UserError, match="incomplete") as error:
        load_cache(str(cache))
    assert f"move {cache} away" in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--path", str(pristine[1]), "--output", str(cache), "--no_progress"])
    assert exit_info.value.code == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted(TENSOR_FILES)  # untouched
    shutil.move(cache, cache.with_name("moved-away"))
    convert.main(["--path", str(pristine[1]), "--output", str(cache), "--negatives", "50", "--seed", "0",
                  "--no_progress"])
    load_cache(str(cache))


# Edits a hostile or unlucky hand could make: a byte of a tensor file, a metadata field.
edits = st.one_of(
    st.tuples(st.just("byte"), st.sampled_from(TENSOR_FILES), st.floats(0, 1, exclude_max=True),
              st.integers(1, 255)),
    st.tuples(st.just("field"), st.sampled_from(["num_users", "num_items", "num_train", "negatives",
                                                 "format_version", "files"]),
              st.one_of(st.integers(-3, 10**6), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2),
                        st.booleans())),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=edits)
def test_an_edited_cache_is_refused_or_loads_unchanged(pristine, tmp_path_factory, edit):
    """Never a traceback, never a cache that differs from what convert.py wrote."""
    folder = shutil.copytree(pristine[0], tmp_path_factory.mktemp("fuzz") / "cache")
    if edit[0] == "byte":
        _, name, where, xor = edit
        path = folder / name
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= xor
        path.write_bytes(bytes(data))
    else:
        _, key, value = edit
        metadata = metadata_of(folder)
        metadata[key] = value
        write_metadata(folder, metadata)
    try:
        loaded = load_cache(str(folder))
    except UserError as error:
        assert "\n" not in str(error)
        return
    good = load_cache(str(pristine[0]))
    for name in ("train", "test", "test_negatives", "user_ids", "item_ids"):
        assert torch.equal(getattr(loaded, name), getattr(good, name)), name
    assert (loaded.num_users, loaded.num_items) == (good.num_users, good.num_items)


def test_the_suggested_command_names_the_caches_own_convert_settings(cache, other_cache):
    """Convert's defaults (seed 1) would draw other negatives than this cache's (seed 0): the fix says which."""
    damage("truncated file", cache, other_cache)
    with pytest.raises(UserError, match=r"--output \S+ --negatives 50 --seed 0 --min_ratings 20\)"):
        load_cache(str(cache))
