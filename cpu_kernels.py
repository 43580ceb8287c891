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

# Rows are worked on in pieces of this many elements: few enough that a piece's mask is still in the caches when
# the clamp reads it, many enough that the per-call cost (each op wakes the other threads) stays small. With the
# ReLU and mask in one clamp, on the AMX Xeon of benchmarks/README.md (2 MiB of L2 a core, 480 MiB of L3), 2^23
# made whole training steps at 2^20 about 5% faster in bf16 and 3% in fp32 than 2^21 (2^22 and 2^24 between or
# the same, 2^26 slower); with the ReLU and mask in two passes, 2^21 had been the fastest.
PIECE_ELEMENTS = 1 << 23
# gather_dot gathers and multiplies pieces of this many elements: 65,536 rows of 64, whose forward over 2^20 pairs
# took 45 ms, against 97 ms in pieces of 8,192 rows, 58 ms of 32,768 and 56 ms of 262,144 (benchmarks/README.md).
GATHER_DOT_PIECE_ELEMENTS = 1 << 22


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
    p = _dropout_p(p)
    if p == 0.0:
        return x.relu_()
    return _ReluDropout.apply(x, p)


def _dropout_p(p):
    """p (a number or a one-element tensor, as dropout takes) as a float, refused outside [0, 1)."""
    p = float(p)
    if not 0 <= p < 1:  # NaN included: a p past 1 would keep nothing, a negative one everything
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return p


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
        _refuse_create_graph()
        (y,) = ctx.saved_tensors
        return _relu_dropout_grad_(grad, y), None


def gather_add_relu_dropout_unscaled(a, b, a_index, b_index, p):
    """relu_dropout_unscaled(a[a_index] + b[b_index], p) for row tables a [A, D] and b [B, D], indexed by the
    TableIndex a_index and b_index.

    The sum is one gather of row pairs (gather_add), then rectified and masked in place piece by piece; the masks
    are those relu_dropout_unscaled draws for the same shape. The backward rectifies the gradient in place, over
    the output (as relu_dropout_unscaled's does), and sums it into gradients of a and b (TableIndex.sums).
    """
    return _GatherAddReluDropout.apply(a, b, a_index, b_index, _dropout_p(p))


class _GatherAddReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_index, b_index, p):
        y = _apply_relu_dropout_(gather_add(a, b, a_index.index, b_index.index), p)
        ctx.save_for_backward(y, a_index.index, b_index.index)  # unpacked in backward: autograd's version check
        ctx.indices = a_index, b_index
        return y

    @staticmethod
    def backward(ctx, grad):
        _refuse_create_graph()
        y, _, _ = ctx.saved_tensors
        a_index, b_index = ctx.indices
        grad = _relu_dropout_grad_(grad, y)
        return a_index.sums(grad), b_index.sums(grad), None, None, None


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
        if index.numel():
            _refuse_rows_outside(*index.aminmax(), table.shape[0])
    pairs = torch.stack((a_index, b_index + a.shape[0]), 1)  # of the wider index dtype (stack promotes)
    return torch.nn.functional.embedding_bag(pairs, torch.cat((a, b)) if both is None else both, mode="sum")


def gather_dot(a, b, a_index, b_index, weight, dtype=None):
    """(a[a_index] * b[b_index]) @ weight: for each pair of rows of tables a [A, D] and b [B, D] (indexed by the
    TableIndex a_index and b_index), the sum of their element-wise product weighted by weight [D]. In `dtype` (the
    tables and weight cast to it, their gradients cast back), by default the tables', autocast or not. GMF's share of
    NeuMF's logit, without its [N, D] intermediates:

    the forward gathers, multiplies and sums piece by piece in cache, where torch wrote both gathers, the product
    and its gradient at full size and read them back; the backward needs no per-pair rows at all. a's gradient is
    weight * sum over a row's pairs of grad * b[b_index] (one embedding_bag with per-sample weights, b's likewise),
    and weight's is sum over a's rows of a * that sum. At 2^20 pairs of ml-20m's 64-wide fp32 tables, timed alone:
    the forward 45 ms against 129-137 ms, the user table's gradient 13 ms against 138 ms (benchmarks/README.md).
    """
    if (a_index.rows, b_index.rows) != (a.shape[0], b.shape[0]):
        raise ValueError(f"gather_dot's indices are into tables of {a_index.rows} and {b_index.rows} rows, "
                         f"its tables have {a.shape[0]} and {b.shape[0]}")
    if a_index.index.shape != b_index.index.shape:  # else the longer one's extra pairs would go unread
        sizes = f"{a_index.index.shape[0]} and {b_index.index.shape[0]}"
        raise ValueError(f"gather_dot needs one index per pair: got {sizes}")
    if dtype is not None:
        a, b, weight = a.to(dtype), b.to(dtype), weight.to(dtype)
    return _GatherDot.apply(a, b, a_index, b_index, weight)


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, a_index, b_index, weight):
        ctx.save_for_backward(a, b, weight, a_index.index, b_index.index)
        ctx.indices = a_index, b_index
        return _gather_dot(a, b, a_index.index, b_index.index, weight)

    @staticmethod
    def backward(ctx, grad):
        a, b, weight, _, _ = ctx.saved_tensors
        a_index, b_index = ctx.indices
        a_sums = a_index.weighted_sums(b, b_index.index, grad)
        b_sums = b_index.weighted_sums(a, a_index.index, grad)
        # weight's gradient is the pairs' sum of grad * a[a_index] * b[b_index], summed here by the rows of the table
        # with fewer (ml-20m's items: 26,744 rows, not 138,493), and from the rows the pairs used only: an inf in a row
        # no pair took would make inf * 0
        table, sums, index = (a, a_sums, a_index) if a.shape[0] <= b.shape[0] else (b, b_sums, b_index)
        used = index.used()
        return a_sums * weight, b_sums * weight, None, None, (table[used] * sums[used]).sum(0)


def embedding(index, table):
    """nn.functional.embedding(index, table): the rows of table [R, D] at index [N], whose backward sums the
    gradient into the table's rows as TableIndex.sums does, not as embedding's own backward: the same fp32 sums
    (in the samples' order), and whole training steps at 65,536 samples of ml-20m's shapes 5-9% faster in bf16 and
    fp32 (benchmarks/README.md)."""
    return _Embedding.apply(index, table)


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, table):
        ctx.save_for_backward(index)
        ctx.rows = table.shape[0]
        return torch.index_select(table, 0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return None, TableIndex(index, ctx.rows).sums(grad.contiguous())


@torch.autocast("cpu", enabled=False)  # torch.mv in the tables' dtype
def _gather_dot(a, b, a_index, b_index, weight):
    out = a.new_empty(a_index.shape[0])
    rows = max(1, min(a_index.shape[0], GATHER_DOT_PIECE_ELEMENTS // max(1, a.shape[1])))
    a_rows, b_rows = a.new_empty(rows, a.shape[1]), b.new_empty(rows, b.shape[1])
    for lo in range(0, a_index.shape[0], rows):
        piece = slice(lo, lo + rows)
        count = out[piece].shape[0]
        products = torch.index_select(a, 0, a_index[piece], out=a_rows[:count])
        products.mul_(torch.index_select(b, 0, b_index[piece], out=b_rows[:count]))
        torch.mv(products, weight, out=out[piece])
    return out


def _refuse_rows_outside(low, high, rows):
    """IndexError unless the lowest and highest index are rows of a table of `rows` rows."""
    if low < 0 or high >= rows:
        raise IndexError(f"index {int(low if low < 0 else high)} is out of range for a table of {rows} rows")


class TableIndex:
    """An index [N] into a table of `rows` rows, with what summing per-sample gradients into the table's rows
    takes: the samples sorted by row (stably: each row's in their order) and where each row's run starts.
    Computed on first use, once however many gathers share the index (the factored first layer and GMF gather
    the same users and items).

    Each row's sum is then one bag of an embedding_bag, which reads the row's samples, adds them in fp32
    whatever their dtype and writes the row once, rounded once. torch's sorting scatter_add_ sorted the index
    again in every call and, for a bf16 gradient, needed an fp32 copy of it to sum in fp32 (a bf16 running sum
    of ones stops at 256); embedding's own backward adds row by row, each thread scanning all N indices. The
    factored first layer's two table gradients (2^20 bf16 samples, 256 wide, ml-20m's tables), timed alone: 341 ms
    by scatter_add_ in pieces, about 210 ms by two bags, the two sorts and the in-place ReLU/mask gradient
    (benchmarks/README.md).
    """

    def __init__(self, index, rows):
        if index.dtype not in (torch.int32, torch.int64):  # a bool index would read as rows 0 and 1
            raise TypeError(f"a table index must be int32 or int64, got {index.dtype}")
        self.index, self.rows = index, rows
        self._runs, self._version = None, None

    def runs(self):
        """(order, starts): the samples in row order, and the position in order of each row's first sample.
        Sorted again if the index was changed in place since (its version counter)."""
        if self._version != self.index._version:
            ordered, order = torch.sort(self.index, stable=True)
            if ordered.numel():  # a row past the last would be summed into the last row's run
                _refuse_rows_outside(ordered[0], ordered[-1], self.rows)
            starts = torch.searchsorted(ordered, torch.arange(self.rows))
            self._runs, self._version = (order, starts), self.index._version
        return self._runs

    def used(self):
        """[rows] bool: the rows that have samples."""
        _, starts = self.runs()
        return torch.diff(starts, append=starts.new_tensor([self.index.shape[0]])) > 0

    def sums(self, values):
        """[rows, D] in values' dtype: row r sums the rows of values [N, D] whose index is r (0 if none)."""
        if not values.shape[1]:  # embedding_bag refuses a 0-wide table
            return values.new_zeros(self.rows, 0)
        order, starts = self.runs()
        return torch.nn.functional.embedding_bag(order, values, starts, mode="sum")

    def weighted_sums(self, table, table_index, weights):
        """[rows, D] in table's dtype: row r sums weights[n] * table[table_index[n]] over the samples n whose
        index is r (0 if none)."""
        if not table.shape[1]:
            return table.new_zeros(self.rows, 0)
        order, starts = self.runs()
        # index_select gathers 1-D tensors faster than indexing (2.1-2.6 against 2.4-3.7 ms for 2^20 int32 or fp32)
        return torch.nn.functional.embedding_bag(table_index.index_select(0, order), table, starts, mode="sum",
                                                 per_sample_weights=weights.index_select(0, order))


def _row_pieces(x):
    """(elements of the largest piece, slices of x's rows) for pieces of PIECE_ELEMENTS elements or so,
    in whole rows, a multiple of 64 of them (the elements of one random word at one bit each, so that
    pieces draw the same bits as the whole would)."""
    rows = min(x.shape[0], max(64, PIECE_ELEMENTS // max(1, x.shape[1]) // 64 * 64))
    return rows * x.shape[1], [slice(lo, lo + rows) for lo in range(0, x.shape[0], max(1, rows))]


def _apply_relu_dropout_(x, p):
    """x = relu_dropout_unscaled(x, p) in place, piece by piece: each piece's mask is drawn and applied while
    the piece is in cache.

    Both in one clamp of the floats' bits, read as integers of the same width: a float with its sign bit set is a
    negative integer, so clamping the integer at 0 is the ReLU (-0.0 and -inf become 0.0, as a NaN with its sign
    bit set does: a diverged run is still stopped, by its weights, each epoch), and the mask, an upper bound of 0 or
    the largest integer, zeroes an element or keeps it. One pass where a clamp at 0 and an AND with a mask of 0 or
    all ones took two: at 2^21 elements, 0.24 ms against 0.44 in bf16, 0.38 against 0.69 in fp32
    (benchmarks/README.md). A dropped element is 0 whatever it was (+inf and NaN too, which a float product with
    the mask would leave NaN, and whose gradient the backward would then pass on), on torch's mask path too.
    """
    if x.dim() != 2 or not x.is_floating_point():  # the pieces are rows; integers and complex have no float bits
        raise ValueError(f"the CPU kernels' ReLU and dropout take floats of shape [rows, features], got {x.dtype} "
                         f"of shape {list(x.shape)}")
    piece_elements, pieces = _row_pieces(x)
    drawer = _MaskDrawer(piece_elements, p, x.dtype) if p and _mask_bits(p) else None
    if drawer:
        for rows in pieces:
            piece = x[rows]
            bits = piece.view(drawer.mask.dtype)
            torch.clamp(bits, drawer.zero, drawer.draw(piece.shape), out=bits)
        return x
    if p == 0.0:
        return x.relu_()
    # p is not a multiple of 1/256: torch's own mask, as its dropout draws it (unscaled).
    return x.clamp_min_(0.0).masked_fill_(torch.empty_like(x).bernoulli_(1.0 - p) == 0, 0.0)


def _refuse_create_graph():
    """In a backward of the ReLU and dropout kernels: their gradient is written on the output's bits, without
    history, so under backward(create_graph=True) a second derivative would silently leave their term out (and
    torch.autograd.grad prunes once_differentiable's error node, so that does not stop it)."""
    if torch.is_grad_enabled():
        raise RuntimeError("the CPU kernels' ReLU and dropout have no second derivative (their gradient is written on "
                           "the output's bits); for higher derivatives set model.cpu_kernels = False")


def _relu_dropout_grad_(grad, y):
    """The input gradient of y = relu_dropout_unscaled(x): grad where y > 0, else 0 (the dropout scale is in
    grad already, through the next layer's scaled weights), in one call over the whole tensor (pieces were
    slower here: nothing reads a piece again while it is in cache).

    The result is written over y, which nothing needs any more: every node that saved y consumed it, so has run
    its backward before this one (and autograd's version check would stop a retained graph from reading it
    again). ReLU's own backward, threshold_backward, keeps grad where y > 0; in bf16 it is run on the floats' bits
    read as int16, as _apply_relu_dropout_ works: an integer is > 0 where y > 0 or is a NaN without its sign bit,
    and not for -0.0 or anything with its sign bit set. On the floats it converts every bf16 element to fp32 and
    back; on the bits, 39 ms at 2^20 x 256, where the bits clamped to [0, 1] and an integer product with grad's took
    62 (benchmarks/README.md). In fp32 the floats themselves, which pass every NaN's gradient on (NaN <= 0 is
    false), where the bits stop a NaN with its sign bit set, which only torch's own mask path (p not a multiple of
    1/256) can leave.
    """
    dtype = y.dtype
    if y.dtype == grad.dtype == torch.bfloat16:
        y, grad = y.view(torch.int16), grad.view(torch.int16)
    return torch.ops.aten.threshold_backward(grad, y, 0, grad_input=y).view(dtype)


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
    table lookup (an index_select of a [256, 8 / bits] table): for p = 0.5 the mask costs 1/64 of a
    random draw and about 1.5 memory passes an element.
    """
    p = _dropout_p(p)
    if _mask_bits(p) is None:
        return None
    return _MaskDrawer(math.prod(shape), p).draw(shape).ne(0).float()


class _MaskDrawer:
    """Draws dropout masks (see dropout_mask) of up to `elements` elements into buffers it keeps, so
    that masks drawn piece by piece allocate (and page-fault) nothing per piece.

    A mask is integers of the width of the activations' dtype (int16 for bf16, int32 for fp32): 0 drops an
    element, the largest integer keeps it, applied to the floats' bits as the upper bound of a clamp.
    """

    def __init__(self, elements, p, dtype=torch.float32):
        self.bits = _mask_bits(p)
        self.per_byte = 8 // self.bits
        dtype = _SAME_WIDTH_INTEGER[dtype.itemsize]
        self.table = _mask_table(self.bits, int(p * (1 << self.bits)), dtype)
        codes = (elements + self.per_byte - 1) // self.per_byte
        self.words = torch.empty((codes + 7) // 8, dtype=torch.int64)
        self.codes = torch.empty(codes, dtype=torch.int32)
        self.mask = torch.empty(codes, self.per_byte, dtype=dtype)
        self.zero = torch.zeros((), dtype=dtype)
        # A table row as one element of its width where a dtype has it (16 bytes: bf16's masks at p = 0.5, as
        # complex128): index_select copies 1-D elements by assignment, rows by a call each, about 2x as slow
        # (1.39-2.03 ms against 0.70-0.76 ms for 2^20 codes, benchmarks/README.md).
        row = _SAME_WIDTH_ELEMENT.get(self.per_byte * self.mask.itemsize)
        self._rows = (self.table.view(row).view(-1), self.mask.view(row).view(-1)) if row else (self.table, self.mask)

    @eager_under_compile
    def draw(self, shape):
        count = math.prod(shape)
        codes = (count + self.per_byte - 1) // self.per_byte
        self.codes[:codes].copy_(random_bytes(codes, self.words))
        table, out = self._rows
        torch.index_select(table, 0, self.codes[:codes], out=out[:codes])
        return self.mask[:codes].view(-1)[:count].view(shape)


def _mask_bits(p):
    """The fewest random bits per element (1, 2, 4 or 8) that express p exactly, or None."""
    return next((bits for bits in (1, 2, 4, 8) if (p * (1 << bits)).is_integer()), None)


_SAME_WIDTH_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_SAME_WIDTH_ELEMENT = {**_SAME_WIDTH_INTEGER, 16: torch.complex128}


@functools.lru_cache(maxsize=16)
def _mask_table(bits, threshold, dtype):
    """[256, 8 // bits] of the integer dtype: for each byte value, the masks of its bit fields, lowest bits first:
    the dtype's largest integer (kept) where the field is >= threshold, else 0."""
    fields = torch.arange(0, 8, bits)
    values = (torch.arange(256)[:, None] >> fields) & ((1 << bits) - 1)
    return torch.where(values >= threshold, torch.iinfo(dtype).max, 0).to(dtype)


def random_bytes(count, words=None):
    """`count` uniform random bytes from torch's default CPU generator, eight per random draw, drawn into
    the int64 buffer `words` (at least (count + 7) // 8 long) when given."""
    needed = (count + 7) // 8
    if words is not None and (words.dtype != torch.int64 or words.numel() < needed):
        raise ValueError(f"random_bytes({count}) needs an int64 buffer of {needed} words, got {words.dtype} "
                         f"of {words.numel()}")
    words = torch.empty(needed, dtype=torch.int64) if words is None else words[:needed]
    # torch's full 64-bit draw (from the lowest int64, no upper bound). int32 words of their full range took 2.75x
    # as long a byte: such a range is drawn as a 64-bit number modulo 2^32 (benchmarks/README.md).
    return words.random_(-(2**63), None).view(torch.uint8)[:count]


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
