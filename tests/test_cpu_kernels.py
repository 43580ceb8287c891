"""The CPU kernels (cpu_kernels.py) compute what the plain torch ops compute.

The fused ReLU+dropout must draw Bernoulli masks from the seeded generator (torch's own mask where p is
not a multiple of 1/256) with the right gradient, leaving the kept activations unscaled (the model scales
the next layer's weights by dropout_scale instead); the factored first layer must give the per-pair
forward's logits and gradients; the in-place evaluation scorer must rank like the plain forward.
"""
import pytest
import torch

import cpu_kernels
import neumf
from cpu_kernels import relu_dropout_unscaled
from neumf import NeuMF, build_model


@pytest.mark.parametrize("p", [0.5, 0.25, 0.75, 0.125, 26 / 256, 0.3])  # 1, 2, 2, 4, 8 bits; torch's mask
def test_fused_relu_dropout_keeps_one_minus_p_with_the_right_gradient(p):
    x = torch.randn(512, 256, requires_grad=True)
    torch.manual_seed(3)
    y = relu_dropout_unscaled(x, p)
    torch.manual_seed(3)
    assert torch.equal(relu_dropout_unscaled(x, p), y)  # the seed decides the mask
    positive = x.detach() > 0
    kept = (y != 0) & positive
    assert kept.sum().item() / positive.sum().item() == pytest.approx(1 - p, abs=0.01)
    assert torch.equal(y[kept], x.detach()[kept])  # unscaled: the next layer's weights take 1 / (1 - p)
    assert (y[~kept] == 0).all()
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, torch.where(kept, grad, 0.0))
    assert cpu_kernels.dropout_scale(p) == 1 / (1 - p)


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
@pytest.mark.parametrize("p", [0.5, 0.75, 0.25])
def test_the_relu_and_mask_work_on_the_floats_bits(dtype, mask_dtype, p):
    """Masks of 0 or the largest integer of the activation's width, a clamp of its bits; the ReLU an integer
    clamp: the same values as the float ReLU where the mask keeps, else 0, -0.0 and +-inf too (a kept -0.0 becomes
    +0.0: the integer clamp at 0)."""
    assert cpu_kernels._MaskDrawer(64, p, dtype).mask.dtype == mask_dtype
    x = torch.randn(512, 256).to(dtype)
    x[0, :4] = torch.tensor([-0.0, float("-inf"), float("inf"), 0.0])
    torch.manual_seed(3)
    y = cpu_kernels.relu_dropout_unscaled_(x.clone(), p)
    torch.manual_seed(3)
    mask = cpu_kernels.dropout_mask(x.shape, p)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    # (a dropped +inf is 0: the float product would make it NaN)
    assert y.dtype == dtype and torch.equal(y, torch.where(mask > 0, x.clamp_min(0), 0.0).to(dtype))


def _rounded_once(got, exact, dtype):
    """got is exact (fp32 or float64) rounded once to dtype: to the last bit in fp32; in bf16 to a nearest value
    (embedding_bag rounds a tie away from zero, torch's casts to even)."""
    if dtype == torch.float32:
        return got.dtype == dtype and torch.equal(got, exact.float())
    exact = exact.double()
    nearest = (exact.to(dtype).double() - exact).abs()
    return got.dtype == dtype and bool(torch.all((got.double() - exact).abs() <= nearest))


@pytest.mark.parametrize(("dtype", "bits"), [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
def test_the_relu_dropout_gradient_passes_where_the_output_is_positive_and_overwrites_it(dtype, bits):
    """grad where y > 0, else 0, written over y; -0.0 (torch's own mask path can leave it) gets none. A NaN passes
    its gradient on, as threshold_backward lets it (NaN <= 0 is false), except in bf16, worked on the bits, a NaN
    with its sign bit set (which only torch's own mask path can leave)."""
    y = torch.tensor([0.0, -0.0, 1.5, float("inf"), 3.0, 0.0, float("nan")], dtype=dtype)
    y.view(bits)[5] = -64 if dtype == torch.bfloat16 else -4194304  # 0xffc0, 0xffc00000: a NaN with its sign bit set
    assert y[5].isnan() and y.view(bits)[5] < 0
    grad = torch.arange(1.0, 8.0).to(dtype)
    out = cpu_kernels._relu_dropout_grad_(grad, y)
    assert out.data_ptr() == y.data_ptr()
    assert out.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 0.0 if dtype == torch.bfloat16 else 6.0, 7.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("piece_rows", [2048, 32, None])  # three pieces (the last partial), 157, one
def test_the_gather_kernels_backward_sums_rows_in_fp32_over_every_piece(monkeypatch, dtype, piece_rows):
    """The gradient is rectified piece by piece, and every row's sum is the fp32 sum of its samples in their order,
    to the last bit (then rounded once to the tables' dtype): row 0 of `a` takes 5000 / 7 ones-sized gradients,
    past bf16's 256. Rows never gathered get zeros."""
    if piece_rows:
        monkeypatch.setattr(cpu_kernels, "PIECE_ELEMENTS", piece_rows * 256)
    torch.manual_seed(0)
    a, b = torch.randn(7, 256).to(dtype), torch.randn(300, 256).to(dtype)
    a_index, b_index = torch.randint(0, 7, (5000,), dtype=torch.int32), torch.randint(0, 290, (5000,))
    a.requires_grad_(), b.requires_grad_()
    indices = cpu_kernels.TableIndex(a_index, 7), cpu_kernels.TableIndex(b_index, 300)
    y = cpu_kernels.gather_add_relu_dropout_unscaled(a, b, *indices, 0.0)
    grad = torch.randn(5000, 256).to(dtype)
    expected_grad = torch.where(y > 0, grad, 0).float()  # before the backward, which writes over y
    grads = torch.autograd.grad(y, (a, b), grad)
    for total, index, rows in zip(grads, (a_index, b_index), (7, 300), strict=True):
        expected = torch.zeros(rows, 256)
        for sample, row in enumerate(index.tolist()):  # one sample after another
            expected[row] += expected_grad[sample]
        assert _rounded_once(total, expected, dtype)
    assert torch.count_nonzero(grads[1][290:]) == 0


@pytest.mark.parametrize("changed", [0, 1])
def test_the_gather_kernels_backward_refuses_an_index_changed_since_the_forward(changed):
    """The sums are grouped by the index the forward read: an index changed in place in between would put the
    gradients in the wrong rows, so autograd's version check stops it."""
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    a_index, b_index = torch.tensor([0, 1, 3]), torch.tensor([4, 4, 0])
    y = cpu_kernels.gather_add_relu_dropout_unscaled(
        a, b, cpu_kernels.TableIndex(a_index, 4), cpu_kernels.TableIndex(b_index, 5), 0.5)
    g = cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(a_index, 4), cpu_kernels.TableIndex(b_index, 5),
                               torch.ones(8))
    (a_index, b_index)[changed][0] = 2
    for out in (y, g):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_add_sums_each_pair_of_rows_rounded_once(dtype):
    """fp32: a[i] + b[j] to the last bit. bf16: the exact sum rounded once to a nearest bf16 (a tie may go either
    way: embedding_bag rounds it away from zero, add_ to even), whether the joined table is given or not."""
    torch.manual_seed(0)
    a, b = torch.randn(70, 256).to(dtype), torch.randn(30, 256).to(dtype)
    a_index, b_index = torch.randint(0, 70, (5000,), dtype=torch.int32), torch.randint(0, 30, (5000,))
    got = cpu_kernels.gather_add(a, b, a_index, b_index)
    assert got.dtype == dtype and got.shape == (5000, 256)
    assert torch.equal(cpu_kernels.gather_add(a, b, a_index, b_index, torch.cat((a, b))), got)
    assert torch.equal(cpu_kernels.gather_add(a, b, a_index, b_index, torch.cat((a, b)) * 2), got * 2)  # it reads both
    exact = a.double()[a_index.long()] + b.double()[b_index]
    if dtype == torch.float32:
        assert torch.equal(got, a[a_index.long()] + b[b_index])
    else:
        assert torch.all((got.double() - exact).abs() <= (exact.to(dtype).double() - exact).abs())
    assert cpu_kernels.gather_add(a, b, a_index[:0], b_index[:0]).shape == (0, 256)


@pytest.mark.parametrize(("a_index", "b_index"), [(3, 0), (-1, 0), (0, 2), (0, -1)])
def test_gather_add_refuses_a_row_outside_its_table(a_index, b_index):
    """Both tables are read as one: a's row 3 would be b's row 0, and b's row -1 a's last, silently."""
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(IndexError, match=r"out of range for a table of [32] rows"):
        cpu_kernels.gather_add(a, b, torch.tensor([0, a_index]), torch.tensor([1, b_index]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_table_index_sums_each_rows_samples_in_fp32(dtype, index_dtype):
    """Row r sums the samples whose index is r (rows never taken get zeros), in fp32 rounded once to the values'
    dtype, as embedding's own backward sums in fp32 (its bf16 backward rounds at every addition: 10x the error)."""
    torch.manual_seed(0)
    index = torch.randint(0, 40, (3000,), dtype=index_dtype)  # rows 40..49 never taken
    grad = torch.randn(3000, 24).to(dtype)
    rows = cpu_kernels.TableIndex(index, 50)
    summed = rows.sums(grad)
    expected = torch.ops.aten.embedding_dense_backward(grad.float(), index, 50, -1, False)
    assert _rounded_once(summed, expected, dtype)
    assert torch.count_nonzero(summed[40:]) == 0
    assert rows.runs() is rows.runs()  # sorted once, however many gathers share the index
    assert rows.sums(grad[:, :0]).shape == (50, 0)
    assert rows.weighted_sums(grad[:, :0], index, torch.ones(3000, dtype=dtype)).shape == (50, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_embedding_is_torchs_forward_and_backward(dtype, index_dtype):
    """Rows gathered as nn.functional.embedding gathers them; the table gradient embedding's own backward gives in
    fp32, rounded once to the table's dtype: rows taken many times sum all their gradients, rows never taken get
    zeros."""
    torch.manual_seed(0)
    table = torch.randn(50, 24, dtype=dtype)
    index = torch.randint(0, 40, (3000,), dtype=index_dtype)  # rows 40..49 never taken
    grad = torch.randn(3000, 24, dtype=dtype)
    ours = table.clone().requires_grad_()
    rows = cpu_kernels.embedding(index, ours)
    assert torch.equal(rows, torch.nn.functional.embedding(index, table))
    rows.backward(grad)
    expected = torch.ops.aten.embedding_dense_backward(grad.float(), index, 50, -1, False)
    assert _rounded_once(ours.grad, expected, dtype)
    assert torch.count_nonzero(ours.grad[40:]) == 0


def test_table_index_sums_add_every_sample_of_a_row():
    grad = torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]])
    summed = cpu_kernels.TableIndex(torch.tensor([2, 0, 2], dtype=torch.int32), 4).sums(grad)
    assert summed.tolist() == [[10.0, 20.0], [0.0, 0.0], [101.0, 202.0], [0.0, 0.0]]
    table, table_index = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([1, 0, 0], dtype=torch.int32)
    weighted = cpu_kernels.TableIndex(torch.tensor([2, 0, 2]), 4).weighted_sums(table, table_index,
                                                                              torch.tensor([5.0, 6.0, 7.0]))
    assert weighted.tolist() == [[6.0, 12.0], [0.0, 0.0], [22.0, 34.0], [0.0, 0.0]]  # 6 [1, 2]; 5 [3, 4] + 7 [1, 2]


@pytest.mark.parametrize("bad", [4, -1])
def test_table_index_refuses_a_row_outside_its_table(bad):
    """Sorted, a row past the table's last would be summed into the last row's run, silently."""
    rows = cpu_kernels.TableIndex(torch.tensor([0, bad, 3]), 4)
    with pytest.raises(IndexError, match=f"index {bad} is out of range for a table of 4 rows"):
        rows.sums(torch.ones(3, 2))


def test_table_index_sums_of_a_bf16_gradient_add_in_fp32():
    """Each row sums ~700 ones: a bf16 running sum would stop at 256; an fp32 one rounded once is the count."""
    torch.manual_seed(0)
    index = torch.randint(0, 7, (5000,))
    summed = cpu_kernels.TableIndex(index, 7).sums(torch.ones(5000, 256, dtype=torch.bfloat16))
    counts = torch.bincount(index, minlength=7).float()
    assert summed.dtype == torch.bfloat16
    assert torch.equal(summed.float(), counts[:, None].expand(7, 256).bfloat16().float())


@pytest.mark.parametrize("piece_rows", [64, None])  # 47 pieces, the last partial; one
def test_gather_dot_is_the_weighted_product_of_each_pair_with_its_gradients(monkeypatch, piece_rows):
    """GMF's logits (a[i] * b[j]) @ w and their gradients for a, b and w, as plain torch computes them (float64
    here; fp32 rounding apart), in fp32 under bf16 autocast too; rows never gathered get zero gradients."""
    if piece_rows:
        monkeypatch.setattr(cpu_kernels, "GATHER_DOT_PIECE_ELEMENTS", piece_rows * 16)
    torch.manual_seed(0)
    a, b, w = torch.randn(50, 16), torch.randn(30, 16), torch.randn(16)
    a_index, b_index = torch.randint(0, 45, (3000,), dtype=torch.int32), torch.randint(0, 30, (3000,))
    grad = torch.randn(3000)
    ours = [t.clone().requires_grad_() for t in (a, b, w)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cpu_kernels.gather_dot(ours[0], ours[1], cpu_kernels.TableIndex(a_index, 50),
                                     cpu_kernels.TableIndex(b_index, 30), ours[2])
    got.backward(grad)
    plain = [t.double().requires_grad_() for t in (a, b, w)]
    expected = (plain[0][a_index.long()] * plain[1][b_index]) @ plain[2]
    expected.backward(grad.double())
    assert got.dtype == torch.float32 and got.shape == (3000,)
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(ours, plain, strict=True):
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(ours[0].grad[45:]) == 0


def test_gather_dot_in_a_given_dtype_casts_the_tables_and_returns_their_gradients_in_theirs():
    """gather_dot(..., dtype=bf16) on fp32 tables (GMF in CPU training under autocast): bf16 logits within bf16's
    rounding of the exact ones, and fp32 gradients for the fp32 tables and weight, within bf16 tolerance."""
    torch.manual_seed(0)
    a, b, w = torch.randn(50, 16), torch.randn(30, 16), torch.randn(16)
    a_index, b_index = torch.randint(0, 50, (3000,)), torch.randint(0, 30, (3000,))
    grad = torch.randn(3000)
    ours = [t.clone().requires_grad_() for t in (a, b, w)]
    got = cpu_kernels.gather_dot(*ours[:2], cpu_kernels.TableIndex(a_index, 50), cpu_kernels.TableIndex(b_index, 30),
                                 ours[2], torch.bfloat16)
    got.backward(grad.bfloat16())
    plain = [t.double().requires_grad_() for t in (a, b, w)]
    expected = (plain[0][a_index] * plain[1][b_index]) @ plain[2]
    expected.backward(grad.double())
    assert got.dtype == torch.bfloat16
    scale = expected.detach().abs().max()
    torch.testing.assert_close(got.double(), expected.detach(), rtol=0.02, atol=0.02 * scale)
    for mine, theirs in zip(ours, plain, strict=True):
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0.03, atol=0.03 * theirs.grad.abs().max())


def test_gather_dot_of_no_pairs_is_empty_and_of_unequal_indices_refused():
    a, b, w = torch.randn(5, 4, requires_grad=True), torch.randn(3, 4), torch.randn(4)
    got = cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(torch.tensor([], dtype=torch.int64), 5),
                                 cpu_kernels.TableIndex(torch.tensor([], dtype=torch.int64), 3), w)
    assert got.shape == (0,)
    got.sum().backward()
    assert torch.count_nonzero(a.grad) == 0
    with pytest.raises(ValueError, match="one index per pair: got 2 and 1"):
        cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(torch.tensor([0, 1]), 5),
                               cpu_kernels.TableIndex(torch.tensor([2]), 3), w)


@pytest.mark.parametrize("inf_in", ["a", "b"])
@pytest.mark.parametrize("a_rows, b_rows", [(10, 6), (6, 10)])
def test_gather_dot_weight_gradient_ignores_rows_no_pair_took(inf_in, a_rows, b_rows):
    """An inf in a row the batch never took, of either table, the one with fewer rows or the other (the weight's
    gradient is summed by the rows of the smaller): plain torch's gradients stay finite, so must these (inf * 0 in
    a sum over every row would make the output layer's gradient NaN at every step)."""
    torch.manual_seed(0)
    a, b, w = torch.randn(a_rows, 4), torch.randn(b_rows, 4), torch.randn(4)
    (a if inf_in == "a" else b)[-1, 0] = float("inf")
    a_index, b_index = torch.randint(0, a_rows - 1, (40,)), torch.randint(0, b_rows - 1, (40,))
    ours = [t.clone().requires_grad_() for t in (a, b, w)]
    cpu_kernels.gather_dot(ours[0], ours[1], cpu_kernels.TableIndex(a_index, a_rows),
                           cpu_kernels.TableIndex(b_index, b_rows), ours[2]).sum().backward()
    plain = [t.clone().requires_grad_() for t in (a, b, w)]
    ((plain[0][a_index] * plain[1][b_index]) @ plain[2]).sum().backward()
    for mine, theirs in zip(ours, plain, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)
    assert ours[2].grad.isfinite().all()


@pytest.mark.parametrize("a_rows, b_rows", [(10, 6), (6, 10)])
def test_gather_dot_sums_the_weight_gradient_over_the_smaller_table(monkeypatch, a_rows, b_rows):
    """Over ml-20m's 26,744 item rows, not its 138,493 user rows: 7-9 ms against 42-46 ms a step."""
    tables, used = [], cpu_kernels.TableIndex.used
    monkeypatch.setattr(cpu_kernels.TableIndex, "used", lambda self: tables.append(self.rows) or used(self))
    a, b, w = (torch.randn(a_rows, 4), torch.randn(b_rows, 4), torch.randn(4, requires_grad=True))
    a_index, b_index = torch.randint(0, a_rows, (40,)), torch.randint(0, b_rows, (40,))
    cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(a_index, a_rows), cpu_kernels.TableIndex(b_index, b_rows),
                           w).sum().backward()
    assert tables == [6]


def test_gather_dot_refuses_indices_into_other_tables():
    a, b, w = torch.randn(5, 4), torch.randn(3, 4), torch.randn(4)
    with pytest.raises(ValueError, match="tables of 6 and 3 rows, its tables have 5 and 3"):
        cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(torch.tensor([0]), 6),
                               cpu_kernels.TableIndex(torch.tensor([0]), 3), w)


def test_a_table_index_changed_in_place_is_sorted_again():
    """A TableIndex kept across two forwards whose index was refilled in between: the second backward must use
    the new index (each forward saves the index as it then is, so autograd's version check cannot see this)."""
    torch.manual_seed(0)
    a, b, w = torch.randn(4, 3, requires_grad=True), torch.randn(3, 3), torch.randn(3)
    index, other = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 2, 0, 1, 2])
    rows, other_rows = cpu_kernels.TableIndex(index, 4), cpu_kernels.TableIndex(other, 3)
    cpu_kernels.gather_dot(a, b, rows, other_rows, w).sum().backward()
    index.copy_(torch.tensor([3, 3, 3, 3, 3, 1]))
    a.grad = None
    cpu_kernels.gather_dot(a, b, rows, other_rows, w).sum().backward()
    expected = torch.autograd.grad(((a[index] * b[other]) @ w).sum(), a)[0]
    torch.testing.assert_close(a.grad, expected)


def test_table_index_refuses_an_index_that_is_not_integers():
    with pytest.raises(TypeError, match=r"int32 or int64, got torch\.bool"):
        cpu_kernels.TableIndex(torch.tensor([True, False]), 2)


@pytest.mark.parametrize("p", [-0.5, 1.0, 1.5, float("nan")])
def test_the_fused_relu_dropout_refuses_p_outside_0_1(p):
    x = torch.randn(64, 8)
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
        relu_dropout_unscaled(x, p)
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
        cpu_kernels.gather_add_relu_dropout_unscaled(x[:4], x[:4], cpu_kernels.TableIndex(torch.tensor([0]), 4),
                                                     cpu_kernels.TableIndex(torch.tensor([1]), 4), p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_relu_dropout_kernels_refuse_double_backward(dtype):
    """Their gradients are written on the output's bits, with no history: a second derivative through them silently
    left their term out (torch.autograd.grad prunes once_differentiable's error node), so asking for one raises."""
    a = torch.randn(4, 5).to(dtype).requires_grad_()
    index = cpu_kernels.TableIndex(torch.tensor([0, 1, 3]), 4)
    outputs = cpu_kernels.gather_add_relu_dropout_unscaled(a, a, index, index, 0.5), relu_dropout_unscaled(a * 1, 0.5)
    for out in outputs:
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad((out.float() ** 2).sum() + (a.float() ** 3).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):  # not torch's message about out= arguments
        torch.autograd.grad(relu_dropout_unscaled(a * 1, 0.5).float().sum(), a, create_graph=True)


def test_gather_dot_of_zero_wide_tables_is_zero():
    """model="mlp": NeuMF with a 0-wide GMF branch."""
    a, b, w = torch.randn(5, 0, requires_grad=True), torch.randn(3, 0, requires_grad=True), torch.randn(0)
    got = cpu_kernels.gather_dot(a, b, cpu_kernels.TableIndex(torch.tensor([4, 0]), 5),
                                 cpu_kernels.TableIndex(torch.tensor([2, 2]), 3), w)
    assert got.tolist() == [0.0, 0.0]
    got.sum().backward()
    assert a.grad.shape == (5, 0) and b.grad.shape == (3, 0)


def test_mask_table_reads_each_bit_field_of_a_byte():
    # 2 bits per element, p = 0.25 (kept iff the field is >= 1: the largest integer); byte 0b11_10_01_00.
    table = cpu_kernels._mask_table(2, 1, torch.int16)
    assert table.shape == (256, 4) and table.dtype == torch.int16
    assert table[0b11100100].tolist() == [0, 32767, 32767, 32767]
    assert table[0].tolist() == [0] * 4
    assert cpu_kernels._mask_table(1, 1, torch.int32)[0b10].tolist() == [0, 2**31 - 1] + [0] * 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("p", [0.5, 0.25, 0.1875, 3 / 256])
def test_masks_are_the_table_rows_of_the_drawn_bytes_bit_for_bit(dtype, p):
    # Rows of 2 to 16 bytes are copied as one element (int16 .. complex128): a NaN's bits must not change on the way
    # (bf16's 0x7fff x 8 is a NaN as complex128), and the mask must be the table's rows of random_bytes's bytes.
    torch.manual_seed(1)
    drawer = cpu_kernels._MaskDrawer(1000, p, dtype)
    mask = drawer.draw((10, 77)).clone()
    torch.manual_seed(1)
    codes = cpu_kernels.random_bytes(-(-770 // drawer.per_byte)).long()
    assert torch.equal(mask, drawer.table[codes].view(-1)[:770].view(10, 77))


def test_mask_rows_of_a_dtype_s_width_are_copied_as_one_element():
    """bf16's masks at p = 0.5 (rows of 8 int16, 16 bytes) are looked up as 1-D complex128 elements, about 2x as fast
    as rows; fp32's 32-byte rows have no such dtype and stay rows."""
    table, out = cpu_kernels._MaskDrawer(64, 0.5, torch.bfloat16)._rows
    assert (table.dtype, table.shape, out.dtype, out.dim()) == (torch.complex128, (256,), torch.complex128, 1)
    table, out = cpu_kernels._MaskDrawer(64, 0.25, torch.bfloat16)._rows  # 4 int16: int64
    assert (table.dtype, table.shape) == (torch.int64, (256,))
    table, out = cpu_kernels._MaskDrawer(64, 0.5, torch.float32)._rows
    assert (table.dtype, table.shape) == (torch.int32, (256, 8))


def test_dropout_mask_keeps_every_position_of_a_byte_alike():
    # Each of a byte's 8 bits becomes one element: every position must keep half, independently.
    torch.manual_seed(0)
    mask = cpu_kernels.dropout_mask((1 << 16, 8), 0.5)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    kept = (mask > 0).double()
    torch.testing.assert_close(kept.mean(0), torch.full((8,), 0.5, dtype=torch.float64), atol=0.01, rtol=0)
    corr = torch.corrcoef(kept.T) - torch.eye(8, dtype=torch.float64)
    assert corr.abs().max().item() < 0.03
    assert cpu_kernels.dropout_mask((7,), 0.3) is None  # 0.3 is no multiple of 1/256: torch's mask instead


def test_masks_are_drawn_eagerly_under_compile():
    """torch.compile must not trace the mask drawing (AOT autograd mishandles its dtype view), so that
    a compiled model draws eager's masks: only the multiply below is in the traced graph."""
    import torch._dynamo

    def dropped(x):
        return x * cpu_kernels.dropout_mask(x.shape, 0.5)

    explained = torch._dynamo.explain(dropped)(torch.ones(64, 8))
    assert explained.op_count == 1


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
    expected = torch.nn.functional.dropout(torch.relu(x), p, training=True) * (1 - p)  # unscaled
    next_expected = torch.rand(1)
    expected.backward(grad)
    expected_grad, x.grad = x.grad, None
    torch.manual_seed(7)
    out = relu_dropout_unscaled(x, p)
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
    relu_dropout_unscaled(x, 0.5).sum().backward()
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


# The fast paths against the plain computation, written out per sample in float64 below: odd sizes,
# every kind of dropout mask, both index types, 1x1 tables, the switch to the factored path, the in-place
# scorer's pieces, and bf16 autocast.

ODD = {"nb_users": 37, "nb_items": 23, "mf_dim": 5, "mlp_layer_sizes": (18, 13, 7)}  # first layer 18 -> 13
# 1, 2, 4 and 8 random bits per element, and one that is no multiple of 1/256 (torch's own mask).
DROPOUTS = [0.5, 0.25, 6 / 16, 26 / 256, 0.3]


def kernel_masks(batch, widths, p):
    """The dropout masks the CPU kernels draw from torch's generator, rebuilt from their definition
    (cpu_kernels.dropout_mask): random int64 words read as bytes, each byte split into 8 / bits fields,
    lowest bits first; an element is kept, scaled by 1 / (1 - p), iff its field is >= p 2^bits. A p that
    is no multiple of 1/256 gets torch's dropout mask."""
    bits = next((b for b in (1, 2, 4, 8) if (p * (1 << b)).is_integer()), None)
    if bits is None:
        return [torch.nn.functional.dropout(torch.ones(batch, w), p).double() for w in widths]
    masks = []
    for width in widths:
        count = batch * width
        codes = -(-count // (8 // bits))
        words = torch.empty(-(-codes // 8), dtype=torch.int64).random_(-(2**63), None)
        data = words.view(torch.uint8)[:codes].long()
        fields = (data[:, None] >> torch.arange(0, 8, bits)) & ((1 << bits) - 1)
        keep = fields.flatten()[:count] >= round(p * (1 << bits))
        masks.append(keep.view(batch, width).double() / (1 - p))
    return masks


def torch_masks(batch, widths, p):
    """The masks torch's own dropout draws, layer after layer (the plain model's)."""
    return [torch.nn.functional.dropout(torch.ones(batch, w), p).double() for w in widths]


def reference_logits(params, mf_dim, users, items, masks=()):
    """NeuMF per sample, by the paper, in float64: params maps state_dict names to tensors."""
    user, item = params["user_embed.weight"][users.long()], params["item_embed.weight"][items.long()]
    x = torch.cat((user[:, mf_dim:], item[:, mf_dim:]), 1)
    n = 0
    while f"mlp.{n}.weight" in params:
        x = torch.relu(x @ params[f"mlp.{n}.weight"].T + params[f"mlp.{n}.bias"])
        if masks:
            x = x * masks[n]
        n += 1
    gmf = user[:, :mf_dim] * item[:, :mf_dim]
    return (torch.cat((gmf, x), 1) @ params["final.weight"].T + params["final.bias"]).squeeze(1)


def far_from_init(model, seed=0):
    """Weights of order 1 (the init's 0.01 would hide most rounding and most mistakes)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def models(config):
    """{path name: model} with the same weights: plain torch, the CPU kernels per pair, and factored."""
    plain = far_from_init(NeuMF(**config))
    kernels = build_model(config, "cpu")
    kernels.load_state_dict(plain.state_dict())
    per_pair = build_model(config, "cpu")
    per_pair.load_state_dict(plain.state_dict())
    per_pair._factor_first_layer = lambda batch: False
    return {"plain": plain, "per_pair": per_pair, "factored": kernels}


def run_and_reference(model, users, items, seed=1, autocast=False):
    """(logits, {name: grad}) of the model and of the float64 reference with the same dropout masks."""
    config = model.config
    widths = config["mlp_layer_sizes"][1:]
    p = config["dropout"] if model.training else 0.0
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(users, items)
    weights = torch.linspace(-0.5, 1, len(users))  # a loss whose gradient differs per sample
    (logits.float() * weights).sum().backward()
    torch.manual_seed(seed)
    draw = torch_masks if not model.cpu_kernels else kernel_masks
    masks = draw(len(users), widths, p) if p else []
    params = {name: t.detach().double().requires_grad_() for name, t in model.state_dict().items()}
    expected = reference_logits(params, config["mf_dim"], users, items, masks)
    (expected * weights.double()).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return logits, expected, grads, {name: t.grad for name, t in params.items()}


def assert_fp32_close(actual, expected, what=""):
    """Equal up to fp32 rounding, relative to the tensor's scale (a gradient sums hundreds of terms)."""
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= 1e-5 * max(1.0, expected.abs().max().item()), f"{what}: off by {error:.3g}"


def assert_close_to_reference(logits, expected, grads, expected_grads):
    assert logits.dtype == torch.float32
    assert_fp32_close(logits, expected, "logits")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert_fp32_close(grad, expected_grads[name], name)


def odd_batch(config, size=301, dtype=torch.int64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, config["nb_users"], (size,), generator=g, dtype=dtype),
            torch.randint(0, config["nb_items"], (size,), generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("p", DROPOUTS)
@pytest.mark.parametrize("path", ["plain", "per_pair", "factored"])
def test_every_path_trains_the_per_sample_function(path, p, dtype):
    """Odd batch (301), odd widths, each dropout kind: logits and every gradient as the float64 reference
    computes them with the masks that path draws."""
    config = {**ODD, "dropout": p}
    model = models(config)[path].train()
    users, items = odd_batch(config, dtype=dtype)
    assert model._factor_first_layer(len(users)) == (path == "factored")
    assert_close_to_reference(*run_and_reference(model, users, items))


def test_the_factored_path_switches_on_at_the_table_size():
    config = {**ODD, "dropout": 0.5}
    model = models(config)["factored"].train()
    switch = config["nb_users"] + config["nb_items"]
    factored_calls = []
    real = model._forward_factored
    model._forward_factored = lambda u, i: factored_calls.append(len(u)) or real(u, i)
    for batch in (switch - 1, switch):
        users, items = odd_batch(config, size=batch)
        assert_close_to_reference(*run_and_reference(model, users, items))
    assert factored_calls == [switch]


@pytest.mark.parametrize("path", ["plain", "per_pair", "factored"])
def test_one_by_one_tables(path):
    config = {"nb_users": 1, "nb_items": 1, "mf_dim": 3, "mlp_layer_sizes": (4, 3), "dropout": 0.25}
    model = models(config)[path].train()
    for batch in (1, 2, 33):  # below, at and above the switch (2 table rows)
        users = items = torch.zeros(batch, dtype=torch.int64)
        assert_close_to_reference(*run_and_reference(model, users, items))
    model.eval()
    scores = model.score_candidates(torch.zeros(1, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32))
    params = {name: t.double() for name, t in model.state_dict().items()}
    expected = reference_logits(params, 3, torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
    assert_fp32_close(scores, expected.view(1, 3), "scores")


def reference_scores(model, users, candidates):
    params = {name: t.double() for name, t in model.state_dict().items()}
    n, c = candidates.shape
    return reference_logits(params, model.mf_dim, users[:, None].expand(n, c).reshape(-1),
                            candidates.reshape(-1)).view(n, c)


@pytest.mark.parametrize("layers", [(18, 13, 7), (18, 13), (18,)], ids=["three layers", "one layer", "no layer"])
def test_in_place_scoring_in_pieces_with_a_partial_last_one(monkeypatch, layers):
    config = {**ODD, "mlp_layer_sizes": layers, "dropout": 0.5}
    users = torch.arange(37, dtype=torch.int32)
    candidates = torch.randint(0, 23, (37, 11), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    calls = []
    real = cpu_kernels.mlp_scores_in_place
    monkeypatch.setattr(cpu_kernels, "mlp_scores_in_place", lambda *a: calls.append(a[-1]) or real(*a))
    for path, model in models(config).items():
        model.eval()
        expected = reference_scores(model, users, candidates)
        for piece_samples in (77, neumf.SCORE_PIECE_SAMPLES):  # pieces of 7 users (the last has 2), and one
            monkeypatch.setattr(neumf, "SCORE_PIECE_SAMPLES", piece_samples)
            scores = model.score_candidates(users, candidates)
            assert_fp32_close(scores, expected, f"{path} scores, {piece_samples} samples a piece")
    # The in-place scorer ran (with pieces of 7 rows, then one) wherever the model has a hidden layer.
    assert calls == ([7, 372] * 2 if len(layers) > 1 else [])


def assert_within_bf16_tolerance(logits, expected, grads, expected_grads):
    """bf16 keeps 8 significant bits (a relative rounding of 2^-9): the logits within 3% of their scale,
    each gradient within 5% of its norm (the plain path's errors are a third of that)."""
    assert logits.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (logits.double() - expected).abs().max().item() <= 0.03 * scale
    for name, grad in grads.items():
        error = (grad.double() - expected_grads[name]).norm().item() / expected_grads[name].norm().item()
        assert error <= 0.05, f"{name}: {error:.1%} off"


@pytest.mark.parametrize("p", [0.0, 0.5, 26 / 256])
@pytest.mark.parametrize("path", ["plain", "per_pair", "factored"])
def test_bf16_autocast_stays_within_bf16_tolerance_of_fp32(path, p):
    config = {**ODD, "dropout": p}
    model = models(config)[path].train()
    users, items = odd_batch(config)
    logits, expected, grads, expected_grads = run_and_reference(model, users, items, autocast=True)
    assert_within_bf16_tolerance(logits, expected, grads, expected_grads)
    assert not torch.allclose(logits.double(), expected, rtol=1e-5, atol=1e-5)  # bf16 did compute it


@pytest.mark.parametrize("path", ["plain", "per_pair", "factored"])
def test_bf16_gradients_of_rows_that_many_samples_share(path):
    """30,000 samples of 3 items (10,000 a row, as popular items have in the recipe's 1M batches): the
    factored backward once summed each row's gradients in bf16, where a running sum of ones stalls at 256."""
    config = {"nb_users": 50, "nb_items": 3, "mf_dim": 5, "mlp_layer_sizes": (18, 13, 7), "dropout": 0.0}
    model = models(config)[path].train()
    users, items = odd_batch(config, size=30_000)
    assert_within_bf16_tolerance(*run_and_reference(model, users, items, autocast=True))


def test_bf16_scoring_in_pieces_stays_within_bf16_tolerance(monkeypatch):
    config = {**ODD, "dropout": 0.5}
    users = torch.arange(37, dtype=torch.int32)
    candidates = torch.randint(0, 23, (37, 11), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    monkeypatch.setattr(neumf, "SCORE_PIECE_SAMPLES", 77)
    for model in models(config).values():
        model.eval()
        expected = reference_scores(model, users, candidates)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model.score_candidates(users, candidates)
        assert scores.dtype == torch.float32
        assert (scores.double() - expected).abs().max().item() <= 0.03 * expected.abs().max().item()


def test_bf16_scoring_takes_pieces_four_times_as_large(monkeypatch):
    """bf16 matmuls pay a fixed cost per call: 16,384-candidate pieces scored 1.2-1.4x faster than 4,096 ones
    (benchmarks/README.md); fp32 keeps its cache-sized pieces."""
    seen = []
    monkeypatch.setattr(cpu_kernels, "mlp_scores_in_place", lambda *args: seen.append(args[-1]))
    model = build_model(ODD, "cpu").eval()
    users, candidates = torch.arange(37, dtype=torch.int32), torch.zeros(37, 11, dtype=torch.int32)
    model.score_candidates(users, candidates)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.score_candidates(users, candidates)
    assert seen == [neumf.SCORE_PIECE_SAMPLES // 11, 4 * neumf.SCORE_PIECE_SAMPLES // 11]


@pytest.mark.parametrize("x", [torch.randn(10), torch.randn(2, 3, 4), torch.arange(-4, 4).view(2, 4),
                               torch.randn(4, 4, dtype=torch.complex64)])
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_the_relu_dropout_kernels_refuse_what_is_not_rows_of_floats(x, p):
    # Integers and complex numbers have no float bits to clamp (a complex one would be clamped as int64 halves).
    with pytest.raises(ValueError, match=r"take floats of shape \[rows, features\]"):
        relu_dropout_unscaled(x, p)


def test_dropout_p_may_be_a_tensor_as_in_torchs_dropout_and_is_checked_everywhere():
    x = torch.randn(64, 8)
    torch.manual_seed(1)
    from_tensor = relu_dropout_unscaled(x, torch.tensor(0.5))
    torch.manual_seed(1)
    assert torch.equal(from_tensor, relu_dropout_unscaled(x, 0.5))
    for p in (2.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
            cpu_kernels.dropout_mask((2, 4), p)


def test_random_bytes_refuses_a_buffer_too_short():
    with pytest.raises(ValueError, match=r"needs an int64 buffer of 13 words, got torch\.int64 of 3"):
        cpu_kernels.random_bytes(100, torch.empty(3, dtype=torch.int64))
    assert cpu_kernels.random_bytes(100, torch.empty(13, dtype=torch.int64)).shape == (100,)


def test_torchs_mask_path_zeroes_a_dropped_inf_and_gives_it_no_gradient():
    # p = 0.3 is no multiple of 1/256: torch's mask. inf * 0 would be NaN, and a NaN output passes its gradient on.
    x = torch.full((64, 8), float("inf"), requires_grad=True)
    torch.manual_seed(0)
    y = relu_dropout_unscaled(x * 1, 0.3)
    kept = y != 0
    assert kept.any() and not kept.all() and torch.isinf(y[kept]).all()
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, kept.float())


@pytest.mark.parametrize("p", [0.5, 0.25, 26 / 256])
@pytest.mark.parametrize("width", [7, 33])
def test_masks_drawn_in_pieces_are_the_mask_of_the_whole(monkeypatch, p, width):
    # Pieces of a multiple of 64 rows start on a whole random word whatever the width, so they draw the bits that one
    # draw for the whole tensor would.
    monkeypatch.setattr(cpu_kernels, "PIECE_ELEMENTS", 64 * width * 2)
    x = torch.randn(1001, width)
    assert len(cpu_kernels._row_pieces(x)[1]) > 4
    torch.manual_seed(11)
    y = relu_dropout_unscaled(x, p)
    torch.manual_seed(11)
    assert torch.equal(y, torch.where(cpu_kernels.dropout_mask(x.shape, p) > 0, x.clamp_min(0), 0.0))


def test_the_gather_kernels_without_dropout_draw_no_random_numbers():
    a, b = torch.randn(5, 8), torch.randn(3, 8)
    users, items = torch.tensor([0, 4, 2, 2]), torch.tensor([1, 0, 2, 1])
    state = torch.get_rng_state()
    got = cpu_kernels.gather_add_relu_dropout_unscaled(a, b, cpu_kernels.TableIndex(users, 5),
                                                      cpu_kernels.TableIndex(items, 3), 0.0)
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves training's random stream as it was
    assert torch.equal(got, (a[users] + b[items]).relu())
