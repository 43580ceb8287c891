"""Mixed precision really happens where it is chosen.

A name string and an HR close to fp32's would pass with autocast switched off, so these tests look at
what computes in which type: choose_precision's branches with the CPU's bf16 capability injected
(the branch taken must not depend on the test machine), the MLP layers' output types under the chosen
precision, the GradScaler that fp16 enables, and `--opt_level O2` end to end as on a CPU with native bf16.
"""
import json

import pytest
import torch
from helpers import TINY_MODEL, make_tiny_cache

import cpu_kernels
import devices
import ncf
from cli import UserError
from devices import Precision, choose_precision
from neumf import NeuMF, build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize("native_bf16", [True, False])
def test_o0_is_fp32_whatever_the_cpu(native_bf16):
    for device in (CPU, CUDA):
        precision = choose_precision("O0", "auto", device, native_bf16=native_bf16)
        assert (precision.name, precision.dtype, precision.device_type) == ("fp32", None, device.type)


def test_o2_on_a_cpu_with_native_bf16_is_bf16(recwarn):
    precision = choose_precision("O2", "auto", CPU, native_bf16=True)
    assert precision == Precision("bf16 autocast", torch.bfloat16, "cpu")
    assert not [w for w in recwarn if "bf16" in str(w.message)]


def test_o2_on_a_cpu_without_native_bf16_falls_back_to_fp32_with_a_warning():
    with pytest.warns(UserWarning, match="no native bf16"):
        precision = choose_precision("O2", "auto", CPU, native_bf16=False)
    assert precision == Precision("fp32", None, "cpu")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_o2_with_amp_dtype_bfloat16_forces_bf16_on_any_cpu(native_bf16):
    assert choose_precision("O2", "bfloat16", CPU, native_bf16=native_bf16) == \
        Precision("bf16 autocast", torch.bfloat16, "cpu")


def test_o2_on_cuda_is_fp16_and_bf16_when_asked():
    assert choose_precision("O2", "auto", CUDA) == Precision("fp16 autocast", torch.float16, "cuda")
    assert choose_precision("O2", "bfloat16", CUDA) == Precision("bf16 autocast", torch.bfloat16, "cuda")


def test_fp16_on_cpu_is_a_user_error():
    with pytest.raises(UserError, match="float16 is for CUDA"):
        choose_precision("O2", "float16", CPU, native_bf16=True)


@pytest.mark.parametrize("native", [True, False])
def test_the_default_capability_is_this_cpus(monkeypatch, recwarn, native):
    """Without native_bf16 the answer comes from devices.cpu_has_native_bf16 (what ncf.py uses)."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    precision = choose_precision("O2", "auto", CPU)
    assert precision.dtype == (torch.bfloat16 if native else None)
    assert any("no native bf16" in str(w.message) for w in recwarn) == (not native)


@pytest.fixture
def scalers_made(monkeypatch):
    """(device, enabled) of every GradScaler made: a stand-in replaces torch.amp.GradScaler, which
    disables itself on a machine without CUDA."""
    made = []

    class RecordingScaler:
        def __init__(self, device, enabled=True, **kwargs):
            made.append((device, enabled))

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    return made


@pytest.mark.parametrize("precision, enabled", [
    (Precision("fp16 autocast", torch.float16, "cuda"), True),
    (Precision("bf16 autocast", torch.bfloat16, "cuda"), False),
    (Precision("bf16 autocast", torch.bfloat16, "cpu"), False),
    (Precision("fp32", None, "cuda"), False),
    (Precision("fp32", None, "cpu"), False),
])
def test_only_fp16_enables_loss_scaling(scalers_made, precision, enabled):
    precision.grad_scaler()
    assert scalers_made == [(precision.device_type, enabled)]


def test_the_recipe_flags_on_cuda_enable_the_grad_scaler(scalers_made):
    """--opt_level O2 (the default) on CUDA: fp16 autocast and a GradScaler that is on."""
    args = ncf.parse_args([])
    choose_precision(args.opt_level, args.amp_dtype, CUDA).grad_scaler()
    assert scalers_made == [("cuda", True)]


def record_output_types(model):
    """The dtypes of the MLP layers' outputs, in call order, as each reaches its ReLU and dropout (the first
    layer's too on the per-pair path; the CPU kernels' training runs the layers as products with scaled
    weights, not through the modules, so forward hooks would miss them)."""
    seen = []
    relu_dropout = model._relu_dropout

    def spy(x):
        seen.append(x.dtype)
        return relu_dropout(x)

    model._relu_dropout = spy
    return seen


CONFIG = {"nb_users": 40, "nb_items": 30, "mf_dim": 8, "mlp_layer_sizes": (16, 12, 8), "dropout": 0.25}


@pytest.mark.parametrize("kernels", ["plain", "cpu_kernels"])
def test_under_the_chosen_bf16_the_mlp_computes_in_bf16_and_logits_stay_fp32(kernels, monkeypatch):
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu") if kernels == "cpu_kernels" else NeuMF(**CONFIG)
    seen = record_output_types(model)
    precision = choose_precision("O2", "auto", CPU, native_bf16=True)
    users = torch.randint(0, 40, (50,))  # fewer than the table rows: the per-pair path
    items = torch.randint(0, 30, (50,))
    with precision.autocast():
        logits = model(users, items)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert logits.dtype == torch.float32
    logits.sum().backward()  # master weights and their gradients stay fp32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    # Evaluation scores under the same autocast, in bf16 too (on the CPU kernels' in-place scorer, which
    # calls no module: its terms and layers).
    model.eval()
    seen.clear()
    scorer = cpu_kernels.mlp_scores_in_place

    def spy(row_term, row_vec, table_term, table_vec, candidates, layers, *rest):
        seen.extend([row_term.dtype, table_term.dtype, *(tensor.dtype for layer in layers for tensor in layer)])
        return scorer(row_term, row_vec, table_term, table_vec, candidates, layers, *rest)

    monkeypatch.setattr(cpu_kernels, "mlp_scores_in_place", spy)
    with precision.autocast():
        scores = model.score_candidates(torch.arange(5), torch.randint(0, 30, (5, 7)))
    assert scores.dtype == torch.float32
    assert seen and set(seen) == {torch.bfloat16}


def test_the_factored_path_computes_in_bf16_too():
    """Above the table size the CPU model computes the first layer per row (not through the module):
    its hidden layers must still run in bf16."""
    torch.manual_seed(0)
    model = build_model(CONFIG, "cpu")
    seen = record_output_types(model)
    first_layer_types = []
    original = model._first_layer_terms

    def spy(user_mlp, item_mlp):
        user_term, item_term = original(user_mlp, item_mlp)
        first_layer_types.extend((user_term.dtype, item_term.dtype))
        return user_term, item_term

    model._first_layer_terms = spy
    batch = 100
    assert model._factor_first_layer(batch)
    with choose_precision("O2", "auto", CPU, native_bf16=True).autocast():
        logits = model(torch.randint(0, 40, (batch,)), torch.randint(0, 30, (batch,)))
    assert first_layer_types == [torch.bfloat16, torch.bfloat16]
    assert seen == [torch.bfloat16]  # mlp[1]; mlp[0] was factored
    assert logits.dtype == torch.float32


def test_fp32_precision_leaves_everything_fp32():
    model = NeuMF(**CONFIG)
    seen = record_output_types(model)
    with pytest.warns(UserWarning, match="no native bf16"):
        precision = choose_precision("O2", "auto", CPU, native_bf16=False)
    with precision.autocast():
        model(torch.arange(10), torch.arange(10))
    assert seen == [torch.float32, torch.float32]


def _run(cache, checkpoint_dir, log_path, *flags):
    ncf.main(["--data", str(cache), "-e", "3", "--checkpoint_dir", str(checkpoint_dir), "--log_path", str(log_path),
              *TINY_MODEL, "--seed", "3", *flags])
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    config = next(r for r in records if r["event"] == "config")
    summary = next(r for r in records if r["event"] == "summary")
    return config, [r["loss"] for r in records if r["event"] == "epoch"], summary


@pytest.mark.slow
def test_opt_level_o2_on_a_native_bf16_cpu_trains_in_bf16(tmp_path, monkeypatch, capsys):
    """The recipe's default flags (--opt_level O2) on a CPU with native bf16, whatever this CPU is:
    training and evaluation run the MLP in bf16, the log says so, and HR stays close to fp32's."""
    cache = make_tiny_cache(tmp_path)
    # TINY_MODEL says --opt_level O0; the bf16 run adds --opt_level O2, which wins.
    fp32_config, fp32_losses, fp32 = _run(cache, tmp_path / "ck32", tmp_path / "fp32.json")
    assert fp32_config["precision"] == "fp32"

    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    seen = []
    real_build_model = ncf.build_model

    def build_and_watch(config, device):  # each MLP layer's output as it reaches its ReLU (see record_output_types)
        model = real_build_model(config, device)
        relu_dropout = model._relu_dropout

        def watch(x):
            seen.append((model.training, x.dtype))
            return relu_dropout(x)

        model._relu_dropout = watch
        return model

    scorer = cpu_kernels.mlp_scores_in_place

    def score_and_watch(row_term, row_vec, table_term, table_vec, candidates, layers, *rest):  # evaluation
        seen.extend((False, tensor.dtype) for tensor in (row_term, table_term, *layers[0]))
        return scorer(row_term, row_vec, table_term, table_vec, candidates, layers, *rest)

    monkeypatch.setattr(ncf, "build_model", build_and_watch)
    monkeypatch.setattr(cpu_kernels, "mlp_scores_in_place", score_and_watch)
    bf16_config, bf16_losses, bf16 = _run(cache, tmp_path / "ck16", tmp_path / "bf16.json", "--opt_level", "O2")
    assert bf16_config["precision"] == "bf16 autocast"
    assert bf16_config["args"]["opt_level"] == "O2"
    assert "precision bf16 autocast (O2)" in capsys.readouterr().out
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}  # training steps
    assert {dtype for training, dtype in seen if not training} == {torch.bfloat16}  # evaluation
    print(f"best HR@10 fp32 {fp32['best_hr']:.4f} bf16 {bf16['best_hr']:.4f}; losses {fp32_losses} {bf16_losses}")
    # The same seeds and masks: bf16 rounding is the only difference, so the losses differ a little.
    assert bf16_losses != fp32_losses
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.02)
    assert bf16["best_hr"] == pytest.approx(fp32["best_hr"], abs=0.03)
    assert bf16_losses[-1] < bf16_losses[0]  # it trains
