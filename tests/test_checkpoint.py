"""checkpoint.py: the round trip of what ncf.py saves, and checkpoints written before the restructuring."""
import subprocess
import sys

import pytest
import torch
from helpers import OLD_CHECKPOINT, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cache_format
import checkpoint
import dataloading
import ncf
from cli import UserError
from devices import choose_precision
from model_config import MODELS
from neumf import NeuMF, build_model

CPU = torch.device("cpu")
# OLD_CHECKPOINT's scores of three users' first four candidates, computed by the commit that wrote it.
OLD_SCORES = [[-0.32500192523002625, -0.30417537689208984, -0.297514408826828, -0.2481742948293686],
              [-0.263312429189682, -0.302076518535614, -0.2842312753200531, -0.28986436128616333],
              [-0.28572043776512146, -0.31629708409309387, -0.285431832075119, -0.25382304191589355]]


def test_a_checkpoint_written_before_the_restructuring_loads_and_scores_the_same(loaded_tiny_cache):
    model, ckpt = checkpoint.load_model(str(OLD_CHECKPOINT), loaded_tiny_cache, CPU)
    assert ckpt["config"] == {"nb_users": 300, "nb_items": 200, "mf_dim": 8, "mlp_layer_sizes": [32, 16, 8],
                              "dropout": 0.5}
    data = dataloading.TestData.from_cache(loaded_tiny_cache, CPU)
    scores = model.score_candidates(data.users[:3], data.candidates[:3, :4])
    torch.testing.assert_close(scores, torch.tensor(OLD_SCORES), rtol=1e-5, atol=1e-6)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    figures = ncf.evaluate(model, data, 10, 1 << 20, choose_precision("O0", "auto", CPU), ctx)
    assert (figures["hr"], figures["ndcg"]) == pytest.approx((ckpt["hr"], ckpt["ndcg"]), abs=1e-6)


def test_payload_round_trip(loaded_tiny_cache, tmp_path):
    cache = loaded_tiny_cache
    torch.manual_seed(0)
    model = build_model({"nb_users": cache.num_users, "nb_items": cache.num_items, "mf_dim": 4,
                         "mlp_layer_sizes": [8, 4], "dropout": 0.25}, CPU)
    path = tmp_path / "sub" / "model.pth"
    saved = checkpoint.payload(model, {"factors": 4}, checkpoint.dataset_identity(cache), 3, {"hr": 0.5, "ndcg": 0.25})
    checkpoint.save_atomic(saved, str(path))
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temporary left
    loaded, ckpt = checkpoint.load_model(str(path), cache, CPU)
    assert not loaded.training and loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (ckpt["epoch"], ckpt["hr"], ckpt["ndcg"], ckpt["args"]) == (3, 0.5, 0.25, {"factors": 4})
    assert ckpt["dataset"] == {"num_users": cache.num_users, "num_items": cache.num_items,
                               "source_sha256": cache.metadata["source_sha256"], "min_ratings": 20,
                               "validation": False,
                               "train_sha256": cache.metadata["files"]["train_ratings.pt"]["sha256"],
                               "held_out_sha256": cache_format.evaluation_identity(cache.metadata)["held_out_sha256"]}


def test_rng_states_round_trip():
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    states = checkpoint.rng_states(ctx)
    expected = torch.rand(5)
    checkpoint.restore_rng_states(states, ctx)
    assert torch.equal(torch.rand(5), expected)


def test_inference_does_not_import_the_trainer():
    code = "import sys, inference; print('ncf' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_loading_the_code_does_not_import_dynamo():
    """torch._dynamo doubles start-up (cpu_kernels.eager_under_compile): only a compile may load it."""
    code = "import sys, ncf, inference; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def edited_copy(tmp_path, edit):
    ckpt = torch.load(OLD_CHECKPOINT, weights_only=True)
    edit(ckpt)
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    return str(path)


def set_weight(value):
    def edit(ckpt):
        ckpt["model"]["final.weight"][0, 0] = value
    return edit


def set_config(key, value):
    def edit(ckpt):
        ckpt["config"][key] = value
    return edit


def set_dataset(key, value):
    def edit(ckpt):
        ckpt["dataset"][key] = value
    return edit


def another_item_count(ckpt):
    """A consistent checkpoint of a dataset with one item more."""
    ckpt["config"]["nb_items"] = 201
    ckpt["model"]["item_embed.weight"] = torch.cat([ckpt["model"]["item_embed.weight"]] * 2)[:201]


REFUSED = {
    "NaN weight": (set_weight(float("nan")), "non-finite weights"),
    "infinite weight": (set_weight(float("inf")), "non-finite weights"),
    "layers as a string": (set_config("mlp_layer_sizes", "32 16 8"), "broken config"),
    "users as a float": (set_config("nb_users", 300.0), "broken config"),
    "no dropout key": (lambda ckpt: ckpt["config"].pop("dropout"), "broken config"),
    "negative factors": (set_config("mf_dim", -8), "broken config"),
    "weights not tensors": (lambda ckpt: ckpt["model"].update({"final.bias": [0.0]}), "not tensors"),
    "model not a dict": (lambda ckpt: ckpt.update(model=[1, 2]), "no model or config"),
    "another source file": (set_dataset("source_sha256", "0" * 64), "another dataset or split"),
    "another min_ratings": (set_dataset("min_ratings", 5), "another dataset or split"),
    "another item count": (another_item_count, "items"),
    # The same ratings converted with and without --validation: the training pairs differ.
    "trained with a validation split, cache without": (set_dataset("validation", True), "with a validation split"),
    "another training split": (set_dataset("train_sha256", "0" * 64), "another dataset or split"),
    # Refused from the shapes alone: building it would allocate terabytes before load_state_dict could object.
    "a trillion factors": (set_config("mf_dim", 2**40), "do not fit its config"),
    "weights of another config": (set_config("nb_items", 201), "do not fit its config"),
    "odd first layer": (set_config("mlp_layer_sizes", [33, 16, 8]), "broken config.*must be even"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_broken_or_foreign_checkpoint_is_refused(loaded_tiny_cache, tmp_path, case):
    edit, words = REFUSED[case]
    with pytest.raises(UserError, match=words):
        checkpoint.load_checkpoint(edited_copy(tmp_path, edit), loaded_tiny_cache)


# -- fuzz: an edited checkpoint is refused cleanly, or evaluated correctly -------------------------------------

CONFIG_KEYS = ["nb_users", "nb_items", "mf_dim", "mlp_layer_sizes", "dropout", "model"]
WEIGHTS = ["user_embed.weight", "item_embed.weight", "mlp.0.weight", "mlp.1.bias", "final.weight", "final.bias"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                   st.text(max_size=4), st.lists(st.integers(-3, 40), max_size=4), st.sampled_from(MODELS))
EDITS = st.one_of(
    st.tuples(st.just("set config"), st.sampled_from(CONFIG_KEYS), VALUES),
    st.tuples(st.just("drop config"), st.sampled_from(CONFIG_KEYS), st.none()),
    st.tuples(st.just("set weight"), st.sampled_from(WEIGHTS), st.floats(allow_nan=True, allow_infinity=True)),
    st.tuples(st.just("cut weight"), st.sampled_from(WEIGHTS), st.none()),
    st.tuples(st.just("drop weight"), st.sampled_from(WEIGHTS), st.none()),
    st.tuples(st.just("set dataset"), st.sampled_from(["source_sha256", "min_ratings", "num_users"]), VALUES),
    st.tuples(st.just("set top"), st.sampled_from(["model", "config", "dataset", "args", "hr"]), VALUES),
)


def apply_edit(ckpt, edit):
    kind, key, value = edit
    if kind == "set config" and isinstance(ckpt.get("config"), dict):
        ckpt["config"][key] = value
    elif kind == "drop config" and isinstance(ckpt.get("config"), dict):
        ckpt["config"].pop(key, None)
    elif kind in ("set weight", "cut weight", "drop weight") and isinstance(ckpt.get("model"), dict) \
            and isinstance(ckpt["model"].get(key), torch.Tensor):
        if kind == "set weight" and ckpt["model"][key].numel():  # a weight cut to 0 rows has no element to set
            ckpt["model"][key].view(-1)[0] = torch.tensor(value).float()  # beyond float32's range: inf
        elif kind == "cut weight":
            ckpt["model"][key] = ckpt["model"][key][:-1]
        else:
            del ckpt["model"][key]
    elif kind == "set dataset" and isinstance(ckpt.get("dataset"), dict):
        ckpt["dataset"][key] = value
    elif kind == "set top":
        ckpt[key] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDITS, min_size=1, max_size=3))
def test_fuzz_an_edited_checkpoint_is_refused_cleanly_or_evaluated_correctly(loaded_tiny_cache, tmp_path, edits):
    ckpt = torch.load(OLD_CHECKPOINT, weights_only=True)
    for edit in edits:
        apply_edit(ckpt, edit)
    path = tmp_path / "edited.pth"
    torch.save(ckpt, path)
    try:
        model, _ = checkpoint.load_model(str(path), loaded_tiny_cache, CPU)
    except UserError:
        return  # refused with a one-line message (anything else raised fails the test)
    # Accepted: it must evaluate to honest figures, the same on the plain-torch path.
    data = dataloading.TestData.from_cache(loaded_tiny_cache, CPU)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=CPU)
    precision = choose_precision("O0", "auto", CPU)
    figures = ncf.evaluate(model, data, 10, 1 << 20, precision, ctx)
    assert 0.0 <= figures["mrr"] <= figures["ndcg"] <= figures["hr"] <= 1.0
    plain = NeuMF(**model.config)
    plain.load_state_dict(model.state_dict())
    # The rank metrics the same; the loss to fp32 rounding: the two paths sum a logit's terms in different orders,
    # and a weight edited to -148,322 made logits whose loss sums (346.3) differed by 2e-9.
    assert ncf.evaluate(plain, data, 10, 1 << 20, precision, ctx) == pytest.approx(figures, rel=1e-6, abs=1e-9)
