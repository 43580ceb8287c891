"""The fixtures the test files share; the helpers they are built from live in helpers.py (tests import those
by name). Fixtures that build a dataset, a run or an export are session-scoped: built once, the first time a test
asks, and only read by the tests (a test that writes copies first, as helpers.copy_run does)."""
import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
from hypothesis import settings

pytest.register_assert_rewrite("helpers")  # a failed assert in a helper shows its values, as in a test

import helpers  # noqa: E402
from helpers import ROOT, make_synthetic_cache, make_tiny_cache, train_tiny  # noqa: E402

sys.path.insert(0, str(ROOT))  # the scripts are modules too, whichever way pytest is started

# CI draws the same property-test examples every run (.ci/run sets HYPOTHESIS_PROFILE=ci): a result that depends on
# the draw fails where it was found, not one CI run in many. Elsewhere each run draws anew and keeps its failures in
# .hypothesis/, as Hypothesis does by default.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def run_cli():
    """helpers.run, for the tests that take it as a fixture."""
    return helpers.run


@pytest.fixture
def assert_user_error():
    """helpers.assert_user_error, for the tests that take it as a fixture."""
    return helpers.assert_user_error


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory):
    """make_synthetic_cache's 799 users, converted by the command line: the end-to-end runs' data."""
    return make_synthetic_cache(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """make_tiny_cache's 300 users x 200 items (its folder also holds the ratings.csv it was converted from)."""
    return make_tiny_cache(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def loaded_tiny_cache(tiny_cache):
    """tiny_cache as dataloading.load_cache returns it."""
    from dataloading import load_cache

    return load_cache(str(tiny_cache))


@pytest.fixture(scope="session")
def tiny_validation_cache(tmp_path_factory):
    """The tiny ratings converted with --validation: same source, shape and settings as tiny_cache, another split."""
    return make_tiny_cache(tmp_path_factory.mktemp("tiny_validation"), validation=True)


@pytest.fixture(scope="session")
def tiny_twin(tiny_cache, tmp_path_factory):
    """A copy of tiny_cache that says it was converted from another source file: the same shape, another dataset."""
    twin = tmp_path_factory.mktemp("tiny_twin") / "cache"
    shutil.copytree(tiny_cache, twin)
    meta = json.loads((twin / "metadata.json").read_text())
    meta["source_sha256"] = "f" * 64
    (twin / "metadata.json").write_text(json.dumps(meta))
    return twin


@pytest.fixture(scope="session")
def trained_tiny(tiny_cache, tmp_path_factory):
    """The checkpoint folder of a two-epoch run of the tiny model on tiny_cache (model.pth, last.pth)."""
    return train_tiny(tiny_cache, tmp_path_factory.mktemp("trained_tiny") / "ck", 2).parent


@pytest.fixture(scope="session")
def exported_tiny(tiny_cache, tmp_path_factory):
    """The tiny model trained for one epoch on tiny_cache (cache_dir, checkpoint: its model.pth) and its exports
    (exports: the folder of each format, onnx and torch-export)."""
    import inference

    folder = tmp_path_factory.mktemp("exported_tiny")
    model_path = train_tiny(tiny_cache, folder / "checkpoints", 1)
    exports = {fmt: folder / f"export-{fmt}" for fmt in ("onnx", "torch-export")}
    for fmt, output in exports.items():
        inference.main(["export", "--checkpoint", str(model_path), "--data", str(tiny_cache), "--format", fmt,
                        "--output", str(output)])
    return SimpleNamespace(cache_dir=tiny_cache, checkpoint=model_path, exports=exports)
