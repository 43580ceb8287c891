"""CPU kernels: the same functions as plain torch ops, computed with fewer passes over memory.

Nothing here knows NeuMF: these are tensor functions (ReLU + dropout, a gather-add-ReLU-dropout, an MLP
scoring loop) that neumf.py switches on in one place when a model is built for a CPU. Each one equals
its plain-torch counterpart up to float rounding, with dropout masks of the same distribution, and
tests/test_cpu_kernels.py checks them against it. Why each exists, with its measured gain, is in
benchmarks/README.md ("What each speed-up gave").

Dropout masks are drawn from random bits by table lookup (torch's CPU bernoulli_ draws one random
number per element on one thread), and activations are worked on in cache-sized pieces of rows,
written into reused buffers (fresh 1M-row temporaries cost page faults every step).
"""
import functools
import math
import sys

import torch

# Rows are worked on in pieces of this many elements: few enough that a piece and its mask are still in the
# caches when the next pass reads them, many enough that the per-call cost (each op wakes the other threads)
# stays small. On a 2-core Xeon with 2 MiB of L2 a core, 2^21 (8 MiB of fp32) made whole training steps at
# 2^20 14-17% faster than 2^19, in bf16 and fp32 (2^22 the same, 2^23 slower; benchmarks/README.md).
PIECE_ELEMENTS = 1 << 21
# The gathers' gradients are summed into the tables in pieces of this many elements: each scatter_add_ call pays
# 1.5-2.7 ms however small its piece, so 2^22 was no faster than one call, 2^23 and 2^25 between (bf16 steps
# at 2^20 on the Xeon above; benchmarks/README.md).
SUM_PIECE_ELEMENTS = 1 << 24


def dropout_scale(p):
    """What the dropout here leaves to the layer after it: its kept activations are not scaled by 1 / (1 - p),
    the next layer's weights are (W (s y) = (s W) y). Scaling a few thousand weights costs nothing, where
    scaling the activations took a pass over them, and the ReLU and the mask become integer operations on the
    floats' bits (relu_dropout_unscaled_). In bf16, whose float element-wise kernels convert every element, the
    forward (ReLU and mask) was measured 2.3x as fast and the backward 1.8x; in fp32 the forward the same and
    the backward 1.4x (benchmarks/README.md)."""
    return 1.0 / (1.0 - p)


def relu_dropout_unscaled(x, p):
    """relu_dropout_unscaled_(x.clone(), p), leaving x as it is. Its backward overwrites the output."""
    return relu_dropout_unscaled_(x.clone(), p)


def relu_dropout_unscaled_(x, p):
    """relu(x) with each element kept with probability 1 - p, else 0: dropout(relu(x), p) / dropout_scale(p),
    computed in place in x, which must be an intermediate result (not a leaf). The backward then writes the
    input gradient over the output (see _ReluDropout)."""
    if p == 0.0:
        return x.relu_()
    return _ReluDropout.apply(x, p)


class _ReluDropout(torch.autograd.Function):
    """relu then the dropout mask in place, saving only the output for backward.

    torch's pair keeps relu's output and a float mask of the same size for backward; the backward here
    rebuilds the mask from the output: an element gets gradient iff relu let it through and dropout
    kept it, which is iff the output is positive.
    """

    @staticmethod
    def forward(ctx, x, p):
        ctx.mark_dirty(x)
        y = _apply_relu_dropout_(x, p)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _relu_dropout_grad_(grad, y), None


def gather_add_relu_dropout_unscaled(a, b, a_index, b_index, p):
    """relu_dropout_unscaled(a[a_index] + b[b_index], p) for row tables a [A, D] and b [B, D].

    The sum is one gather of row pairs (gather_add), then rectified and masked in place piece by piece; the masks
    are those relu_dropout_unscaled draws for the same shape. The backward scatters the per-row gradients into
    gradients of a and b.
    """
    return _GatherAddReluDropout.apply(a, b, a_index, b_index, p)


class _GatherAddReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_index, b_index, p):
        y = _apply_relu_dropout_(gather_add(a, b, a_index, b_index), p)
        ctx.save_for_backward(y, a_index, b_index)
        ctx.rows = (a.shape[0], b.shape[0])
        return y

    @staticmethod
    def backward(ctx, grad):
        y, a_index, b_index = ctx.saved_tensors
        a_rows, b_rows = ctx.rows
        return (*_relu_dropout_row_sums(grad, y, (a_index, a_rows), (b_index, b_rows)), None, None, None)


def gather_add(a, b, a_index, b_index, both=None):
    """a[a_index] + b[b_index] for row tables a [A, D] and b [B, D] of one dtype (no autograd of its own);
    `both`, when given, is torch.cat((a, b)), made once by a caller that gathers from the same tables piece
    after piece.

    One embedding_bag sums each pair of rows of [a; b] as it reads them and writes the sum once, where
    index_select twice and add_ write both gathers and read them back: at 2^20 pairs of 256-wide rows of ml-20m's
    tables, 1.8x as fast in bf16 and 1.4x in fp32 with the ReLU and masks after it (benchmarks/README.md). fp32
    sums are the same to the last bit; bf16 sums are added in fp32 and rounded once, as add_ rounds them, but
    with ties away from zero where add_ rounds them to even (fbgemm's rounding; the same half-ulp bound).
    """
    for index, table in ((a_index, a), (b_index, b)):  # one past a's rows, or b's -1, would read the other table
        low, high = index.aminmax() if index.numel() else (0, -1)
        if low < 0 or high >= table.shape[0]:
            bad = int(low if low < 0 else high)
            raise IndexError(f"index {bad} is out of range for a table of {table.shape[0]} rows")
    dtype = torch.promote_types(a_index.dtype, b_index.dtype)
    pairs = torch.stack((a_index.to(dtype), b_index.to(dtype) + a.shape[0]), 1)
    return torch.nn.functional.embedding_bag(pairs, torch.cat((a, b)) if both is None else both, mode="sum")


def gather_rows(table, index):
    """table[index] for a row table [R, D], as nn.functional.embedding(index, table), with the backward of
    sum_rows."""
    return _GatherRows.apply(table, index)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, index):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return torch.index_select(table, 0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return sum_rows(grad.contiguous(), index, ctx.rows), None


def sum_rows(grad, index, rows):
    """The gradient [rows, D] of a row gather: row r sums the rows of grad [N, D] whose index is r, in fp32
    whatever grad's dtype (a bf16 sum is rounded once, at the end).

    scatter_add_ of an index expanded along the rows is torch's sorting kernel for this (the one graph
    libraries use): it sorts the indices once and sums each row's run in parallel, where embedding's own
    backward (embedding_dense_backward) adds row by row, each through a TensorIterator, each thread
    scanning all N indices. Both sum in the order of the samples (the same figures); at 2^20 samples
    into ml-20m's 138,493 users this was measured 1.5x to 2.5x as fast (benchmarks/README.md).
    """
    index = index.long()  # the kernel's index type
    return grad.new_zeros(rows, grad.shape[1]).scatter_add_(0, index[:, None].expand(-1, grad.shape[1]), grad)


def _relu_dropout_row_sums(grad, y, *gathers):
    """The tables' gradients of y = relu_dropout_unscaled(a[a_index] + b[b_index]): for each (index, rows) in
    gathers, sum_rows of the input gradient (_relu_dropout_grad_), in fp32 whatever y's dtype.

    fp32 even under bf16 autocast: a row shared by thousands of samples would otherwise accumulate in bf16, whose
    running sum of ones stops at 256 (autograd casts the result back to the tables' dtype once). The gradient is
    rectified and summed in pieces of SUM_PIECE_ELEMENTS through one reused fp32 buffer, where the whole one
    was written to fresh memory and read back once per table: bf16 steps at 2^20 7% faster (benchmarks/README.md).
    The sums are the same to the last bit: scatter_add_ adds each sample's row into its table row in the order
    of the samples, so piece after piece as in one call.
    """
    width = y.shape[1]
    sums = [torch.zeros(rows, width) for _, rows in gathers]
    rows_per_piece = max(1, min(y.shape[0], SUM_PIECE_ELEMENTS // max(1, width)))
    buffer = torch.empty(rows_per_piece, width)
    for lo in range(0, y.shape[0], rows_per_piece):
        rows = slice(lo, lo + rows_per_piece)
        piece = buffer[: y[rows].shape[0]]
        # threshold_backward casts a bf16 gradient to fp32 as it writes it: one pass
        torch.ops.aten.threshold_backward(grad[rows], y[rows], 0.0, grad_input=piece)
        for total, (index, _) in zip(sums, gathers, strict=True):
            total.scatter_add_(0, index[rows].long()[:, None].expand(-1, width), piece)
    return sums


def _row_pieces(x):
    """(elements of the largest piece, slices of x's rows) for pieces of PIECE_ELEMENTS elements or so,
    in whole rows, a multiple of 32 of them (the elements of one random word at one bit each, so that
    pieces draw the same bits as the whole would)."""
    rows = min(x.shape[0], max(32, PIECE_ELEMENTS // max(1, x.shape[1]) // 32 * 32))
    return rows * x.shape[1], [slice(lo, lo + rows) for lo in range(0, x.shape[0], max(1, rows))]


def _apply_relu_dropout_(x, p):
    """x = relu_dropout_unscaled(x, p) in place, piece by piece: each piece's mask is drawn and applied while
    the piece is in cache.

    Both on the floats' bits, as integers of the same width: a float with its sign bit set is a negative
    integer, so clamping the integer at 0 is the ReLU (-0.0 and -inf become 0.0, as a NaN with its sign bit set
    does: a diverged run is still stopped, by its weights, each epoch), and the mask of 0 or all ones keeps or
    zeroes an element with one AND.
    """
    piece_elements, pieces = _row_pieces(x)
    drawer = _MaskDrawer(piece_elements, p, x.dtype) if p and _mask_bits(p) else None
    if drawer:
        for rows in pieces:
            piece = x[rows]
            piece.view(drawer.mask.dtype).clamp_min_(0).bitwise_and_(drawer.draw(piece.shape))
        return x
    if p == 0.0:
        return x.relu_()
    # p is not a multiple of 1/256: torch's own mask, as its dropout draws it (unscaled).
    return x.clamp_min_(0.0).mul_(torch.empty_like(x).bernoulli_(1.0 - p))


def _relu_dropout_grad_(grad, y):
    """The input gradient of y = relu_dropout_unscaled(x): grad where y > 0, else 0 (the dropout scale is in
    grad already, through the next layer's scaled weights).

    threshold_backward is ReLU's own vectorised backward kernel (much faster than torch.where with a
    boolean mask). The result is written over y, which nothing needs any more: every node that saved y
    consumed it, so has run its backward before this one (and autograd's version check would stop a
    retained graph from reading it again).
    """
    for rows in _row_pieces(y)[1]:
        torch.ops.aten.threshold_backward(grad[rows], y[rows], 0.0, grad_input=y[rows])
    return y


def eager_under_compile(fn):
    """fn, run eagerly (not traced) under torch.compile, like torch.compiler.disable(fn).

    torch.compiler.disable imports torch._dynamo, which takes about as long as importing torch itself
    (2.4 s against 2.7 s on the CPU of benchmarks/README.md) and would double the start-up of every
    process that never builds an optimizer (inference.py, ncf.py --mode test, every refused command
    line). So, like torch's own lazy torch._compile._disable_dynamo, the wrapper is made on the first
    call in a process that has imported torch._dynamo, as torch.compile does before it traces anything;
    elsewhere fn is called directly.
    """
    disabled = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call


# Run eagerly under torch.compile: AOT autograd mishandles the dtype view in random_bytes, and eager
# draws are what the compiled model must reproduce anyway (throughput.py --compile, fallback_random).
@eager_under_compile
def dropout_mask(shape, p):
    """The keep mask relu_dropout_unscaled_ draws for `shape`, as floats: 1 with probability 1 - p, else 0; None
    unless 256 p is an integer.

    Each element takes the fewest random bits that express p exactly: one bit for the default p = 0.5,
    two for 0.25 or 0.75, four or eight for other multiples of 1/256; an element is kept iff its bits,
    read as an integer, are >= p 2^bits. Each random byte then becomes its 8 / bits mask values in one
    table lookup (an embedding gather of a [256, 8 / bits] table): for p = 0.5 the mask costs 1/32 of a
    random draw and about 1.5 memory passes an element.
    """
    if _mask_bits(p) is None:
        return None
    return _MaskDrawer(math.prod(shape), p).draw(shape).float().abs_()


class _MaskDrawer:
    """Draws dropout masks (see dropout_mask) of up to `elements` elements into buffers it keeps, so
    that masks drawn piece by piece allocate (and page-fault) nothing per piece.

    A mask is integers of the width of the activations' dtype (int16 for bf16, int32 for fp32): 0 drops an
    element, -1 (all bits set) keeps it, applied to the floats' bits by a bitwise AND.
    """

    def __init__(self, elements, p, dtype=torch.float32):
        self.bits = _mask_bits(p)
        self.per_byte = 8 // self.bits
        dtype = _SAME_WIDTH_INTEGER[dtype.itemsize]
        self.table = _mask_table(self.bits, int(p * (1 << self.bits))).to(dtype)
        codes = (elements + self.per_byte - 1) // self.per_byte
        self.words = torch.empty((codes + 3) // 4, dtype=torch.int32)
        self.codes = torch.empty(codes, dtype=torch.int32)
        self.mask = torch.empty(codes, self.per_byte, dtype=dtype)

    @eager_under_compile
    def draw(self, shape):
        count = math.prod(shape)
        codes = (count + self.per_byte - 1) // self.per_byte
        self.codes[:codes].copy_(random_bytes(codes, self.words))
        mask = torch.index_select(self.table, 0, self.codes[:codes], out=self.mask[:codes])
        return mask.view(-1)[:count].view(shape)


def _mask_bits(p):
    """The fewest random bits per element (1, 2, 4 or 8) that express p exactly, or None."""
    return next((bits for bits in (1, 2, 4, 8) if (p * (1 << bits)).is_integer()), None)


_SAME_WIDTH_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.lru_cache(maxsize=16)
def _mask_table(bits, threshold):
    """[256, 8 // bits] int64: for each byte value, the masks of its bit fields, lowest bits first: -1 (all
    bits set: kept) where the field is >= threshold, else 0."""
    fields = torch.arange(0, 8, bits)
    values = (torch.arange(256)[:, None] >> fields) & ((1 << bits) - 1)
    return torch.where(values >= threshold, -1, 0)


def random_bytes(count, words=None):
    """`count` uniform random bytes from torch's default CPU generator, four per random draw, drawn into
    the int32 buffer `words` (at least (count + 3) // 4 long) when given."""
    needed = (count + 3) // 4
    words = torch.empty(needed, dtype=torch.int32) if words is None else words[:needed]
    # The full int32 range: random_() alone would leave each word's top bit 0.
    return words.random_(-(2**31), 2**31).view(torch.uint8)[:count]


@torch.no_grad()
def mlp_scores_in_place(row_term, row_vec, table_term, table_vec, candidates, layers, out_weights, out_bias,
                        piece_rows):
    """Scores [n, c] of each row's c candidates, in pieces of `piece_rows` rows (no autograd):

        h = relu(table_term[candidates] + row_term[row])     then h = relu(h W^T + b) per (W, b) in layers
        score = h w_h^T + (table_vec[candidates] * row_vec[row]) w_v^T + out_bias,  (w_h, w_v) = out_weights

    The MLP runs in the terms' and layers' dtype (fp32, or bf16 under mixed precision); the output layer
    and the scores in fp32. The first layer's sums are gather_add's, as in training (the same rounding); the
    other layers are written into the same buffers every piece (out= arguments): allocating each piece's
    activations afresh cost page faults that made the gathers much slower.
    """
    n, c = candidates.shape
    rows = min(piece_rows, n) * c
    terms = torch.cat((table_term, row_term))
    row_of = torch.arange(n, dtype=candidates.dtype)[:, None].expand(n, c)
    vec_buf = table_vec.new_empty(rows, table_vec.shape[1])
    layer_bufs = [table_term.new_empty(rows, weight.shape[0]) for weight, _ in layers]
    weight_h, weight_v = out_weights
    last_buf = weight_h.new_empty(rows, weight_h.shape[1]) if table_term.dtype != weight_h.dtype else None
    scores = torch.empty(n, c, dtype=torch.float32)
    for lo in range(0, n, piece_rows):
        flat = candidates[lo : lo + piece_rows].reshape(-1)
        count = flat.shape[0]
        x = gather_add(table_term, row_term, flat, row_of[lo : lo + piece_rows].reshape(-1), terms).relu_()
        for (weight, bias), buf in zip(layers, layer_bufs, strict=True):
            x = torch.addmm(bias, x, weight.t(), out=buf[:count]).relu_()
        if last_buf is not None:
            x = last_buf[:count].copy_(x)
        vec = torch.index_select(table_vec, 0, flat, out=vec_buf[:count])
        vec.view(count // c, c, vec.shape[1]).mul_(row_vec[lo : lo + piece_rows, None, :])  # may be 0 wide
        logits = scores[lo : lo + piece_rows].view(-1, 1)
        torch.addmm(out_bias, x, weight_h.t(), out=logits).addmm_(vec, weight_v.t())
    return scores
