"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017), as in NVIDIA's NCF recipe.

A GMF branch (element-wise product of user and item embeddings of size `mf_dim`) and an MLP branch
(concatenated user and item embeddings of size `mlp_layer_sizes[0] / 2` each, then Linear+ReLU layers)
are concatenated and projected to one logit.
"""
import functools
import itertools
import math

import torch
from torch import nn

SCORE_CHUNK_SAMPLES = 4096  # see NeuMF.score_candidates


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim=64, mlp_layer_sizes=(256, 256, 128, 64), dropout=0.5):
        super().__init__()
        if mlp_layer_sizes[0] % 2 != 0:
            raise ValueError(f"mlp_layer_sizes[0] must be even (user and item get half each), got {mlp_layer_sizes[0]}")
        self.nb_users = nb_users
        self.nb_items = nb_items
        self.mf_dim = mf_dim
        self.mlp_layer_sizes = tuple(mlp_layer_sizes)
        self.dropout = dropout
        mlp_half = mlp_layer_sizes[0] // 2
        # One table per side holding [GMF | MLP] columns: a single gather (and a single sparse
        # gradient scatter) per side instead of two. Same initialisation and maths as the recipe's
        # four separate tables.
        self.user_embed = nn.Embedding(nb_users, mf_dim + mlp_half)
        self.item_embed = nn.Embedding(nb_items, mf_dim + mlp_half)
        self.mlp = nn.ModuleList(
            nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(mlp_layer_sizes)
        )
        self.final = nn.Linear(mf_dim + mlp_layer_sizes[-1], 1)
        self._init_weights()

    @property
    def config(self):
        """Everything needed to rebuild this model (stored in checkpoints)."""
        return {
            "nb_users": self.nb_users,
            "nb_items": self.nb_items,
            "mf_dim": self.mf_dim,
            "mlp_layer_sizes": list(self.mlp_layer_sizes),
            "dropout": self.dropout,
        }

    def _init_weights(self):
        nn.init.normal_(self.user_embed.weight, std=0.01)
        nn.init.normal_(self.item_embed.weight, std=0.01)
        for layer in self.mlp:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        # LeCun uniform: U(-sqrt(3/fan_in), sqrt(3/fan_in)).
        bound = math.sqrt(3.0 / self.final.in_features)
        nn.init.uniform_(self.final.weight, -bound, bound)
        nn.init.zeros_(self.final.bias)

    def forward(self, user, item):
        """Logits of shape [B] for index tensors `user`, `item` of shape [B] (int32 or int64)."""
        if self._factor_first_layer(user):
            return self._forward_factored(user, item)
        return self._forward_per_sample(user, item)

    def _factor_first_layer(self, user):
        # Per-table work (every user and item row once) beats per-sample work when the batch has more
        # samples than the tables have rows. Measured on the CPU only (ml-20m shapes, batch 2^20: the
        # first layer's forward + backward 6.5 s -> 1.5 s); GPUs keep the recipe's per-sample layout.
        return user.device.type == "cpu" and len(self.mlp) > 0 and user.shape[0] >= self.nb_users + self.nb_items

    def _forward_per_sample(self, user, item):
        # split, not slicing: its backward writes the table gradient rows in one pass, where each
        # slice's backward would zero-fill a [B, mf_dim + mlp_half] tensor and then add into it.
        u_mf, u_mlp = self.user_embed(user).split((self.mf_dim, self.user_embed.embedding_dim - self.mf_dim), 1)
        i_mf, i_mlp = self.item_embed(item).split((self.mf_dim, self.item_embed.embedding_dim - self.mf_dim), 1)
        return self._head(u_mf * i_mf, self._mlp(torch.cat((u_mlp, i_mlp), dim=1)))

    def _forward_factored(self, user, item):
        """The same function as _forward_per_sample, up to float rounding.

        The first MLP layer is linear in the concatenation [user | item]: W [u; i] + b = (W_u u + b) + W_i i.
        So its two terms are computed once per table row and gathered per sample; the backward scatters
        per-sample gradients into per-row ones and does the two small matmuls. Same gradients, same
        dropout masks (the same layers draw them in the same order).
        """
        user_term, item_term = self._first_layer_terms()
        hidden = gather_relu_dropout(user_term, item_term, user, item, self.dropout if self.training else 0.0)
        gmf = nn.functional.embedding(user, self.user_embed.weight[:, : self.mf_dim]) * nn.functional.embedding(
            item, self.item_embed.weight[:, : self.mf_dim])
        return self._head(gmf, self._mlp(hidden, start=1))

    def _first_layer_terms(self):
        """First MLP layer's pre-activation split per table: ([U, L1] user term + bias, [I, L1] item term)."""
        first = self.mlp[0]
        half = first.in_features // 2
        user_term = nn.functional.linear(self.user_embed.weight[:, self.mf_dim :], first.weight[:, :half], first.bias)
        item_term = nn.functional.linear(self.item_embed.weight[:, self.mf_dim :], first.weight[:, half:])
        return user_term, item_term

    def _mlp(self, x, start=0):
        """The MLP branch from layer `start` on; x is that layer's input."""
        for layer in self.mlp[start:]:
            x = relu_dropout_(layer(x), self.dropout if self.training else 0.0)
        return x

    def _head(self, gmf, x):
        """The output layer on [gmf | x], as one product per part: no concatenated copy of both."""
        weight_gmf, weight_mlp = self.final.weight.split((self.mf_dim, x.shape[1]), 1)
        # The 1-wide output layer runs in fp32 even under autocast: it costs nothing, and low-precision
        # logits would create ties between candidates that the HR@k rank counts against the model.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = nn.functional.linear(x.float(), weight_mlp, self.final.bias)
            return logits.addmm_(gmf.float(), weight_gmf.t()).squeeze(1)

    @torch.no_grad()
    def score_candidates(self, users, candidates):
        """Logits [n, C] of each user's C candidate items (evaluation: no dropout, no gradients).

        The first MLP layer is linear in the concatenated [user | item] embeddings, so it splits into
        a user term (computed once per user, not once per candidate) plus an item term (computed once
        per item of the catalogue): 62% of the forward's multiply-adds become a gather and an add.
        Same maths as forward up to float rounding.
        """
        n, c = candidates.shape
        if not len(self.mlp):
            return self(users[:, None].expand(n, c).reshape(-1), candidates.reshape(-1)).view(n, c)
        first = self.mlp[0]
        mlp_half = first.in_features // 2
        u_mf, u_mlp = self.user_embed(users).split((self.mf_dim, mlp_half), 1)
        item_term = nn.functional.linear(self.item_embed.weight[:, self.mf_dim :], first.weight[:, mlp_half:])
        user_term = nn.functional.linear(u_mlp, first.weight[:, :mlp_half], first.bias)
        item_mf = self.item_embed.weight[:, : self.mf_dim]
        # On a CPU, in cache-sized pieces: with 1M-row activations every elementwise pass is a trip
        # through DRAM; pieces of a few thousand rows stay in cache (measured 1.6x faster).
        step = max(1, SCORE_CHUNK_SAMPLES // c) if candidates.device.type == "cpu" else n
        if candidates.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return self._score_pieces_in_place(user_term, u_mf, item_term, item_mf, candidates, step)
        scores = []
        for lo in range(0, n, step):
            flat = candidates[lo : lo + step].reshape(-1)
            rows = flat.shape[0] // c
            # embedding (index_select) gathers rows in parallel, where tensor[flat] indexing measured 2x
            # slower; the user terms are then added in place.
            hidden = nn.functional.embedding(flat, item_term).view(rows, c, -1)
            hidden.add_(user_term[lo : lo + step, None, :])
            gmf = nn.functional.embedding(flat, item_mf).view(rows, c, -1)
            gmf.mul_(u_mf[lo : lo + step, None, :])
            hidden, gmf = hidden.view(rows * c, -1), gmf.view(rows * c, -1)
            hidden = relu_dropout_(hidden, self.dropout if self.training else 0.0)
            scores.append(self._head(gmf, self._mlp(hidden, start=1)).view(rows, c))
        return torch.cat(scores)

    def _score_pieces_in_place(self, user_term, u_mf, item_term, item_mf, candidates, step):
        """score_candidates' loop in fp32 on the CPU, every piece written into the same buffers.

        The same operations as the loop above (gather, add the user term, the MLP, the output layer),
        with out= arguments: allocating each piece's activations afresh cost page faults that made the
        gathers alone 1.5x slower (index_select of 8,192 rows: 0.99 ms allocating, 0.64 ms into a buffer).
        """
        n, c = candidates.shape
        rows = min(step, n) * c
        hidden_buf = item_term.new_empty(rows, item_term.shape[1])
        gmf_buf = item_mf.new_empty(rows, item_mf.shape[1])
        layer_bufs = [item_term.new_empty(rows, layer.out_features) for layer in self.mlp[1:]]
        weight_gmf, weight_mlp = self.final.weight.split((self.mf_dim, self.mlp_layer_sizes[-1]), 1)
        scores = torch.empty(n, c, dtype=torch.float32)
        for lo in range(0, n, step):
            flat = candidates[lo : lo + step].reshape(-1)
            count = flat.shape[0]
            hidden = torch.index_select(item_term, 0, flat, out=hidden_buf[:count])
            hidden.view(-1, c, hidden.shape[1]).add_(user_term[lo : lo + step, None, :])
            x = hidden.relu_()
            for layer, buf in zip(self.mlp[1:], layer_bufs, strict=True):
                x = torch.addmm(layer.bias, x, layer.weight.t(), out=buf[:count]).relu_()
            gmf = torch.index_select(item_mf, 0, flat, out=gmf_buf[:count])
            gmf.view(-1, c, gmf.shape[1]).mul_(u_mf[lo : lo + step, None, :])
            logits = scores[lo : lo + step].view(-1, 1)
            torch.addmm(self.final.bias, x, weight_mlp.t(), out=logits).addmm_(gmf, weight_gmf.t())
        return scores


def relu_dropout(x, p):
    """dropout(relu(x), p), leaving x as it is. On the CPU its backward overwrites the output."""
    return relu_dropout_(x.clone(), p)


def relu_dropout_(x, p):
    """dropout(relu(x), p) computed in place in x, which must be an intermediate result (not a leaf).
    On the CPU the backward then writes the input gradient over the output (see _ReluDropout).

    On the CPU fused, with masks drawn from random bits (fewer passes over memory, and one saved tensor
    instead of two); elsewhere torch's own fused dropout kernel.
    """
    if p == 0.0:
        return x.relu_()
    if x.device.type != "cpu":
        return nn.functional.dropout(x.relu_(), p, training=True)
    return _ReluDropout.apply(x, p)


class _ReluDropout(torch.autograd.Function):
    """relu then dropout in place, saving only the output for backward.

    torch's pair keeps relu's output and a float mask of the same size for backward; the backward here
    rebuilds the mask from the output: an element gets gradient iff relu let it through and dropout
    kept it, which is iff the output is positive. Working in place saves allocating (and page-faulting)
    an activation-sized output per layer.
    """

    @staticmethod
    def forward(ctx, x, p):
        ctx.mark_dirty(x)
        y = _apply_relu_dropout_(x, p)
        ctx.save_for_backward(y)
        ctx.scale = 1.0 / (1.0 - p)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _relu_dropout_grad_(grad, y, ctx.scale), None


def gather_relu_dropout(user_term, item_term, user, item, p):
    """dropout(relu(user_term[user] + item_term[item]), p): the factored first MLP layer's output (CPU
    only, as the factoring is: see NeuMF._factor_first_layer).

    Each piece of rows is gathered, added, rectified and masked while it is in cache, and written
    once: the plain ops wrote two gathered [B, L1] tensors, their sum and a mask to memory and read
    them back. The masks are those relu_dropout draws for the same shape.
    """
    return _GatherReluDropout.apply(user_term, item_term, user, item, p)


class _GatherReluDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user_term, item_term, user, item, p):
        y = user_term.new_empty(user.shape[0], user_term.shape[1])
        item_rows = y.new_empty(_row_pieces(y)[0])

        def fill(rows, piece):
            torch.index_select(user_term, 0, user[rows], out=piece)
            piece.add_(torch.index_select(item_term, 0, item[rows], out=item_rows[: piece.numel()].view(piece.shape)))

        y = _apply_relu_dropout_(y, p, fill)
        ctx.save_for_backward(y, user, item)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.rows = (user_term.shape[0], item_term.shape[0])
        return y

    @staticmethod
    def backward(ctx, grad):
        y, user, item = ctx.saved_tensors
        grad = _relu_dropout_grad_(grad, y, ctx.scale)
        scatter = torch.ops.aten.embedding_dense_backward
        return (scatter(grad, user, ctx.rows[0], -1, False), scatter(grad, item, ctx.rows[1], -1, False),
                None, None, None)


PIECE_ELEMENTS = 1 << 19  # 2 MiB of fp32: a piece and its mask stay in the CPU's cache


def _row_pieces(x):
    """(elements of the largest piece, slices of x's rows) for pieces of PIECE_ELEMENTS elements or so,
    in whole rows, a multiple of 32 of them (the elements of one random word at one bit each, so that
    pieces draw the same bits as the whole would)."""
    rows = min(x.shape[0], max(32, PIECE_ELEMENTS // max(1, x.shape[1]) // 32 * 32))
    return rows * x.shape[1], [slice(lo, lo + rows) for lo in range(0, x.shape[0], max(1, rows))]


def _apply_relu_dropout_(x, p, fill=None):
    """x = dropout(relu(x), p) in place, piece by piece: each piece's mask is drawn and applied while the
    piece is in cache. fill(rows, piece), when given, first writes each piece's values (x's rows)."""
    piece_elements, pieces = _row_pieces(x)
    drawer = _MaskDrawer(piece_elements, p) if p and _mask_bits(p) else None
    for rows in pieces:
        piece = x[rows]
        if fill:
            fill(rows, piece)
        if drawer:
            piece.clamp_min_(0.0).mul_(drawer.draw(piece.shape))
    if drawer:
        return x
    if p == 0.0:
        return x.relu_()
    # p is not a multiple of 1/256: torch's own mask, as its dropout draws it.
    return x.clamp_min_(0.0).mul_(torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p))


def _relu_dropout_grad_(grad, y, scale):
    """The input gradient of y = dropout(relu(x)): grad where y > 0, else 0, times the dropout scale.

    threshold_backward is ReLU's own vectorised backward kernel (measured 4.5x faster on a [2^20, 256]
    tensor than torch.where with a boolean mask), and the scaling happens while each piece is in cache.
    The result is written over y, which nothing needs any more: every node that saved y consumed it,
    so has run its backward before this one (and autograd's version check would stop a retained graph
    from reading it again).
    """
    for rows in _row_pieces(y)[1]:
        torch.ops.aten.threshold_backward(grad[rows], y[rows], 0.0, grad_input=y[rows]).mul_(scale)
    return y


# Run eagerly under torch.compile: AOT autograd mishandles the dtype view in random_bytes, and eager
# draws are what the compiled model must reproduce anyway (throughput.py --compile, fallback_random).
@torch.compiler.disable
def dropout_mask(shape, p):
    """A float dropout mask of `shape`: 1 / (1 - p) with probability 1 - p, else 0; None unless 256 p is
    an integer.

    torch's CPU bernoulli_ draws one random number per element on one thread (a third of a training
    step's time was spent there). Here each element takes the fewest random bits that express p
    exactly: one bit for the default p = 0.5, two for 0.25 or 0.75, four or eight for other multiples
    of 1/256; an element is kept iff its bits, read as an integer, are >= p 2^bits. Each random byte
    then becomes its 8 / bits mask values in one table lookup (an embedding gather of a
    [256, 8 / bits] table): for p = 0.5 the mask costs 1/32 of a random draw and about 1.5 memory
    passes an element, measured 6x faster than comparing a byte per element.
    """
    if _mask_bits(p) is None:
        return None
    return _MaskDrawer(math.prod(shape), p).draw(shape)


class _MaskDrawer:
    """Draws dropout masks (see dropout_mask) of up to `elements` elements into buffers it keeps, so
    that masks drawn piece by piece allocate nothing per piece (small allocations page-faulted: the
    masks of 2,048-row pieces took 3x as long as one whole mask until they reused buffers)."""

    def __init__(self, elements, p):
        self.bits = _mask_bits(p)
        self.per_byte = 8 // self.bits
        self.table = _mask_table(self.bits, int(p * (1 << self.bits)), 1.0 / (1.0 - p))
        codes = (elements + self.per_byte - 1) // self.per_byte
        self.words = torch.empty((codes + 3) // 4, dtype=torch.int32)
        self.codes = torch.empty(codes, dtype=torch.int32)
        self.mask = torch.empty(codes, self.per_byte)

    @torch.compiler.disable
    def draw(self, shape):
        count = math.prod(shape)
        codes = (count + self.per_byte - 1) // self.per_byte
        self.codes[:codes].copy_(random_bytes(codes, self.words))
        mask = torch.index_select(self.table, 0, self.codes[:codes], out=self.mask[:codes])
        return mask.view(-1)[:count].view(shape)


def _mask_bits(p):
    """The fewest random bits per element (1, 2, 4 or 8) that express p exactly, or None."""
    return next((bits for bits in (1, 2, 4, 8) if (p * (1 << bits)).is_integer()), None)


@functools.lru_cache(maxsize=16)
def _mask_table(bits, threshold, scale):
    """[256, 8 // bits] float: for each byte value, the masks of its bit fields, lowest bits first."""
    fields = torch.arange(0, 8, bits)
    values = (torch.arange(256)[:, None] >> fields) & ((1 << bits) - 1)
    return torch.where(values >= threshold, scale, 0.0).float()


def random_bytes(count, words=None):
    """`count` uniform random bytes from torch's default CPU generator, four per random draw, drawn into
    the int32 buffer `words` (at least (count + 3) // 4 long) when given."""
    needed = (count + 3) // 4
    words = torch.empty(needed, dtype=torch.int32) if words is None else words[:needed]
    # The full int32 range: random_() alone would leave each word's top bit 0.
    return words.random_(-(2**31), 2**31).view(torch.uint8)[:count]


class ItemPopularity(nn.Module):
    """Baseline that scores every item by its number of training positives, whoever the user is.

    Scored by the same evaluation code as NeuMF, it is the bar a trained model must clearly clear.
    """

    def __init__(self, train_items, nb_items):
        super().__init__()
        self.register_buffer("counts", torch.bincount(train_items.long(), minlength=nb_items).float())

    def forward(self, user, item):
        return self.counts[item.long()]
