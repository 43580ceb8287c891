"""The CPU kernels (cpu_kernels.py) compute what the plain torch ops compute.

The fused ReLU+dropout must draw Bernoulli masks from the seeded generator (torch's own mask where p is
not a multiple of 1/256) with the right gradient; the factored first layer must give the per-pair
forward's logits and gradients; the in-place evaluation scorer must rank like the plain forward.
"""
import pytest
import torch

import cpu_kernels
import neumf
from cpu_kernels import relu_dropout
from neumf import NeuMF, build_model


@pytest.mark.parametrize("p", [0.5, 0.25, 0.75, 0.125, 26 / 256, 0.3])  # 1, 2, 2, 4, 8 bits; torch's mask
def test_fused_relu_dropout_keeps_one_minus_p_with_the_right_gradient(p):
    x = torch.randn(512, 256, requires_grad=True)
    torch.manual_seed(3)
    y = relu_dropout(x, p)
    torch.manual_seed(3)
    assert torch.equal(relu_dropout(x, p), y)  # the seed decides the mask
    positive = x.detach() > 0
    kept = (y != 0) & positive
    assert kept.sum().item() / positive.sum().item() == pytest.approx(1 - p, abs=0.01)
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p), rtol=1e-6, atol=0)
    assert (y[~kept] == 0).all()
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / (1 - p), 0.0), rtol=1e-6, atol=0)


def test_mask_table_reads_each_bit_field_of_a_byte():
    # 2 bits per element, p = 0.25 (kept iff the field is >= 1), scale 4/3; byte 0b11_10_01_00.
    table = cpu_kernels._mask_table(2, 1, 4 / 3)
    assert table.shape == (256, 4)
    assert table[0b11100100].tolist() == pytest.approx([0.0, 4 / 3, 4 / 3, 4 / 3])
    assert table[0].tolist() == [0.0] * 4


def test_dropout_mask_keeps_every_position_of_a_byte_alike():
    # Each of a byte's 8 bits becomes one element: every position must keep half, independently.
    torch.manual_seed(0)
    mask = cpu_kernels.dropout_mask((1 << 16, 8), 0.5)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    kept = (mask > 0).double()
    torch.testing.assert_close(kept.mean(0), torch.full((8,), 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    corr = torch.corrcoef(kept.T) - torch.eye(8, dtype=torch.float64)
    assert corr.abs().max().item() < 0.03
    assert cpu_kernels.dropout_mask((7,), 0.3) is None  # 0.3 is no multiple of 1/256: torch's mask instead


def test_random_bytes_are_uniform():
    torch.manual_seed(0)
    counts = torch.bincount(cpu_kernels.random_bytes(1 << 20).long(), minlength=256).double()
    expected = (1 << 20) / 256
    assert ((counts - expected) ** 2 / expected).sum().item() < 400  # chi-square, 255 degrees of freedom


@pytest.mark.parametrize("p", [0.3, 0.1])
def test_fused_relu_dropout_draws_torchs_mask_for_other_p(p):
    x = torch.randn(257, 33, requires_grad=True)
    grad = torch.randn(257, 33)
    torch.manual_seed(7)
    expected = torch.nn.functional.dropout(torch.relu(x), p, training=True)
    next_expected = torch.rand(1)
    expected.backward(grad)
    expected_grad, x.grad = x.grad, None
    torch.manual_seed(7)
    out = relu_dropout(x, p)
    got = out.clone()  # the backward writes the input gradient over the output
    next_got = torch.rand(1)
    out.backward(grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=0)
    assert next_got == next_expected  # the same random numbers consumed: later masks agree too


def test_score_candidates_ranks_as_the_plain_forward(monkeypatch):
    torch.manual_seed(0)
    model = build_model({"nb_users": 50, "nb_items": 40, "mf_dim": 8, "mlp_layer_sizes": (16, 32, 8),
                         "dropout": 0.5}, "cpu").eval()
    users = torch.arange(50, dtype=torch.int32)
    candidates = torch.randint(40, (50, 11), dtype=torch.int32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # far from init, so rounding differences would show
        plain = model(users[:, None].expand_as(candidates).reshape(-1), candidates.reshape(-1)).view(50, 11)
        for chunk in (7, 8192):  # several pieces and one
            monkeypatch.setattr(neumf, "SCORE_PIECE_SAMPLES", chunk)
            torch.testing.assert_close(model.score_candidates(users, candidates), plain, rtol=1e-5, atol=1e-4)
        # Under autocast (and on GPUs) the pieces are scored by the allocating loop instead.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(users[:, None].expand_as(candidates).reshape(-1), candidates.reshape(-1)).view(50, 11)
            torch.testing.assert_close(model.score_candidates(users, candidates), plain, rtol=0.01, atol=0.01)


@pytest.mark.parametrize("dropout", [0.5, 0.25, 0.3, 0.0])
def test_factored_first_layer_matches_the_per_sample_forward_and_gradients(monkeypatch, dropout):
    torch.manual_seed(0)
    model = build_model({"nb_users": 40, "nb_items": 25, "mf_dim": 8, "mlp_layer_sizes": (16, 12, 8),
                         "dropout": dropout}, "cpu")
    users = torch.randint(0, 40, (300,), dtype=torch.int32)
    items = torch.randint(0, 25, (300,), dtype=torch.int32)
    assert model._factor_first_layer(300) and not model._factor_first_layer(64) and model._factor_first_layer(65)
    results = []
    # The CPU applies ReLU+dropout piece by piece: one piece, and pieces of 32 rows (10 of them). The
    # masks must not depend on the pieces, nor on the path.
    for piece_elements in (cpu_kernels.PIECE_ELEMENTS, 1):
        monkeypatch.setattr(cpu_kernels, "PIECE_ELEMENTS", piece_elements)
        for factored in (False, True):
            monkeypatch.setattr(model, "_factor_first_layer", lambda batch, factored=factored: factored)
            model.zero_grad()
            torch.manual_seed(1)  # the same dropout masks
            logits = model(users, items)
            logits.square().sum().backward()
            results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    plain, plain_grads = results[0]
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-6)
        for a, b in zip(plain_grads, grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_fused_relu_dropout_takes_an_empty_batch():
    x = torch.empty(0, 8, requires_grad=True)
    relu_dropout(x, 0.5).sum().backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_cpu_kernels_and_plain_torch_give_the_same_model(dropout):
    """Evaluation (no dropout) is the same function on both paths; training differs only in its masks."""
    torch.manual_seed(0)
    config = {"nb_users": 30, "nb_items": 20, "mf_dim": 4, "mlp_layer_sizes": (8, 6, 4), "dropout": dropout}
    fast = build_model(config, "cpu")
    plain = NeuMF(**config)
    plain.load_state_dict(fast.state_dict())
    assert fast.cpu_kernels and not plain.cpu_kernels
    users = torch.randint(0, 30, (100,))
    items = torch.randint(0, 20, (100,))
    fast.eval(), plain.eval()
    torch.testing.assert_close(fast(users, items), plain(users, items), rtol=1e-5, atol=1e-6)
    candidates = torch.randint(0, 20, (30, 7))
    torch.testing.assert_close(fast.score_candidates(torch.arange(30), candidates),
                               plain.score_candidates(torch.arange(30), candidates), rtol=1e-5, atol=1e-6)
