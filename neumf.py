"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017), as in NVIDIA's NCF recipe.

A GMF branch (element-wise product of user and item embeddings of size `mf_dim`) and an MLP branch (concatenated
user and item embeddings of size `mlp_layer_sizes[0] / 2` each, then Linear+ReLU layers with dropout) are
concatenated and projected to one logit. Initialisation as the recipe's: embeddings N(0, 0.01), MLP layers
Glorot-uniform, output layer LeCun-uniform, biases left at PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
as NVIDIA's neumf.py leaves them (the paper's Keras code zeroes them).

`model="gmf"` and `model="mlp"` are the paper's two branches alone (GMF: its embeddings and an output layer; MLP:
its tower and an output layer), trained to initialise NeuMF (§3.4.1, `load_pretrained`). In this implementation a
branch alone is NeuMF with the other branch zero-wide, so every path below serves all three.

The model is plain PyTorch and runs on any device. On a CPU, `build_model` switches on faster kernels for the same
functions (cpu_kernels.py): that is the only place they are chosen.
"""
import itertools
import math
from dataclasses import asdict

import torch
from torch import nn

import cpu_kernels
from model_config import DROPOUT, FACTORS, LAYERS, ModelConfig

PRETRAIN_ALPHA = 0.5  # the paper's weight of the GMF output layer when NeuMF starts from both branches
SCORE_PIECE_SAMPLES = 4096  # CPU evaluation works on pieces of this many candidates (they stay in cache)
BF16_PIECE_SCALE = 4  # and 4x as many in bf16, whose matmuls pay a fixed cost per call (benchmarks/README.md)


class NeuMF(nn.Module):
    def __init__(self, nb_users, nb_items, mf_dim=FACTORS, mlp_layer_sizes=LAYERS, dropout=DROPOUT, model="neumf"):
        super().__init__()
        config = ModelConfig(nb_users, nb_items, mf_dim, mlp_layer_sizes, dropout, model)  # checked, branch widths
        mf_dim, mlp_layer_sizes = config.mf_dim, config.mlp_layer_sizes
        self.model = model
        self.nb_users, self.nb_items, self.mf_dim, self.dropout = nb_users, nb_items, mf_dim, dropout
        self.mlp_layer_sizes = tuple(mlp_layer_sizes)
        self.mlp_half = mlp_layer_sizes[0] // 2 if mlp_layer_sizes else 0
        # One table per side holding [GMF | MLP] columns: one gather and one gradient scatter per side, not
        # two. The same initialisation, maths and checkpoint format as the recipe's four separate tables.
        self.user_embed = nn.Embedding(nb_users, mf_dim + self.mlp_half)
        self.item_embed = nn.Embedding(nb_items, mf_dim + self.mlp_half)
        self.mlp = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(mlp_layer_sizes))
        self.final = nn.Linear(mf_dim + (mlp_layer_sizes[-1] if mlp_layer_sizes else 0), 1)
        self.cpu_kernels = False  # set by build_model
        self._init_weights()

    @property
    def config(self):
        """Everything needed to rebuild this model (stored in checkpoints)."""
        return ModelConfig(self.nb_users, self.nb_items, self.mf_dim, self.mlp_layer_sizes, self.dropout,
                           self.model).as_dict()

    def _init_weights(self):
        nn.init.normal_(self.user_embed.weight, std=0.01)
        nn.init.normal_(self.item_embed.weight, std=0.01)
        for layer in self.mlp:
            nn.init.xavier_uniform_(layer.weight)
        # LeCun uniform: U(-sqrt(3/fan_in), sqrt(3/fan_in)).
        bound = math.sqrt(3.0 / self.final.in_features)
        nn.init.uniform_(self.final.weight, -bound, bound)

    def forward(self, user, item):
        """Logits of shape [B] for index tensors `user`, `item` of shape [B] (int32 or int64)."""
        if self._factor_first_layer(user.shape[0]):
            return self._forward_factored(user, item)
        embed = cpu_kernels.embedding if self.cpu_kernels else nn.functional.embedding
        # split, not slicing: its backward writes the table gradient rows in one pass (each slice's would zero-fill)
        u_mf, u_mlp = embed(user, self.user_embed.weight).split((self.mf_dim, self.mlp_half), 1)
        i_mf, i_mlp = embed(item, self.item_embed.weight).split((self.mf_dim, self.mlp_half), 1)
        if not len(self.mlp):  # an MLP branch of embeddings only (--layers of one size), or none (GMF)
            return self._output(u_mf * i_mf, torch.cat((u_mlp, i_mlp), dim=1))
        hidden = self._relu_dropout(self._first_layer(u_mlp, i_mlp))
        return self._output(u_mf * i_mf, self._mlp(hidden), self._dropout_scale())

    def _factor_first_layer(self, batch):
        # Per-row beats per-pair work when the batch outnumbers the table rows; measured on CPUs only (GPUs: per pair)
        return self.cpu_kernels and len(self.mlp) > 0 and batch >= self.nb_users + self.nb_items

    def _mlp(self, x):
        """The MLP branch after its first layer; x is that layer's output after ReLU and dropout."""
        scale = self._dropout_scale()  # 1 but in CPU training, where the layers run with scaled weights
        for layer in self.mlp[1:]:
            x = layer(x) if scale == 1 else nn.functional.linear(x, layer.weight * scale, layer.bias)
            x = self._relu_dropout(x)
        return x

    def _relu_dropout(self, x):
        p = self.dropout if self.training else 0.0
        if self.cpu_kernels:  # in place (x is the layer's fresh output), and unscaled: see _dropout_scale
            return cpu_kernels.relu_dropout_unscaled_(x, p)
        return nn.functional.dropout(nn.functional.relu(x), p, training=self.training)

    def _dropout_scale(self):  # the dropout's 1 / (1 - p), which the CPU kernels leave to the next layer's weights
        return cpu_kernels.dropout_scale(self.dropout) if self.cpu_kernels and self.training else 1.0

    def _first_layer(self, user_mlp, item_mlp):
        """The first MLP layer on [user | item] as W_u u + b + W_i i: no concatenated (or autocast-cast) copy."""
        first = self.mlp[0]
        weight_user, weight_item = first.weight.split(self.mlp_half, 1)
        return torch.addmm(nn.functional.linear(user_mlp, weight_user, first.bias), item_mlp, weight_item.t())

    def _output(self, gmf, mlp, mlp_scale=1.0):
        """The output layer on [gmf | mlp], one product per part (no concatenated copy); or gmf is its share ([B])."""
        weight_gmf, weight_mlp = self.final.weight.split((self.mf_dim, mlp.shape[1]), 1)
        # fp32 when scoring: bf16 logits tie candidates, which HR@k counts against the model; CPU training ranks none
        dtype = mlp.dtype if self.training and self.cpu_kernels else torch.float32
        with torch.autocast(device_type=mlp.device.type, enabled=False):
            weight_mlp, bias = (weight_mlp * mlp_scale).to(dtype), self.final.bias.to(dtype)
            logits = nn.functional.linear(mlp.to(dtype), weight_mlp, bias).float()
            return logits.squeeze(1) + gmf if gmf.dim() == 1 else logits.addmm_(gmf.float(), weight_gmf.t()).squeeze(1)

    def _first_layer_terms(self, user_mlp, item_mlp):
        """The first MLP layer is linear in the concatenation [user | item]: W [u; i] + b = (W_u u + b) + W_i i.

        Returns the user term of `user_mlp` rows and the item term of `item_mlp` rows: the pre-activation
        of a pair is their sum, so each row's term is computed once, not once per pair.
        """
        first = self.mlp[0]
        weight_user, weight_item = first.weight.split(self.mlp_half, 1)
        return nn.functional.linear(user_mlp, weight_user, first.bias), nn.functional.linear(item_mlp, weight_item)

    def _forward_factored(self, user, item):
        """forward when the batch outnumbers the table rows (CPU kernels): the first layer's terms per row, gathered
        per pair, and GMF's logits without per-pair vectors; same function up to rounding, same dropout masks."""
        user_mf, user_mlp = self.user_embed.weight.split((self.mf_dim, self.mlp_half), 1)
        item_mf, item_mlp = self.item_embed.weight.split((self.mf_dim, self.mlp_half), 1)
        users, items = cpu_kernels.TableIndex(user, self.nb_users), cpu_kernels.TableIndex(item, self.nb_items)
        user_term, item_term = self._first_layer_terms(user_mlp, item_mlp)
        p = self.dropout if self.training else 0.0
        hidden = cpu_kernels.gather_add_relu_dropout_unscaled(user_term, item_term, users, items, p)
        dtype = user_term.dtype if self.training else torch.float32  # as _output's (the recipe's AMP: all in fp16)
        gmf = cpu_kernels.gather_dot(user_mf, item_mf, users, items, self.final.weight[0, : self.mf_dim], dtype)
        return self._output(gmf, self._mlp(hidden), self._dropout_scale())

    @torch.no_grad()
    def score_candidates(self, users, candidates):
        """Logits [n, C] of each user's C candidate items (evaluation: no dropout, no gradients).

        The first MLP layer's user term is computed once per user, not once per candidate, and its item
        term once per item (see _first_layer_terms): most of the forward's multiply-adds become a gather
        and an add. Same maths as forward up to float rounding.
        """
        n, c = candidates.shape
        if not len(self.mlp):
            return self(users[:, None].expand(n, c).reshape(-1), candidates.reshape(-1)).view(n, c)
        u_mf, u_mlp = self.user_embed(users).split((self.mf_dim, self.mlp_half), 1)
        user_term, item_term = self._first_layer_terms(u_mlp, self.item_embed.weight[:, self.mf_dim :])
        item_mf = self.item_embed.weight[:, : self.mf_dim]
        piece = SCORE_PIECE_SAMPLES * (BF16_PIECE_SCALE if user_term.dtype == torch.bfloat16 else 1)
        step = max(1, piece // c) if self.cpu_kernels else n
        if self.cpu_kernels:
            dtype = user_term.dtype  # bf16 under autocast: the hidden layers run in it
            layers = [(layer.weight.to(dtype), layer.bias.to(dtype)) for layer in self.mlp[1:]]
            out_weights = self.final.weight.split((self.mf_dim, self.mlp_layer_sizes[-1]), 1)[::-1]  # (mlp, gmf)
            with torch.autocast("cpu", enabled=False):
                return cpu_kernels.mlp_scores_in_place(user_term, u_mf, item_term.to(dtype), item_mf, candidates,
                                                       layers, out_weights, self.final.bias, step)
        scores = []
        for lo in range(0, n, step):
            flat = candidates[lo : lo + step].reshape(-1)
            rows = flat.shape[0] // c
            # embedding (index_select) gathers rows in parallel (faster than tensor[flat]); user terms added in place
            hidden = nn.functional.embedding(flat, item_term).view(rows, c, item_term.shape[1])
            hidden.add_(user_term[lo : lo + step, None, :])
            gmf = nn.functional.embedding(flat, item_mf).view(rows, c, item_mf.shape[1])  # 0 wide for MLP alone
            gmf.mul_(u_mf[lo : lo + step, None, :])
            hidden = self._relu_dropout(hidden.view(rows * c, item_term.shape[1]))
            scores.append(self._output(gmf.view(rows * c, item_mf.shape[1]), self._mlp(hidden)).view(rows, c))
        return torch.cat(scores)


@torch.no_grad()
def load_pretrained(neumf, gmf, mlp, alpha=PRETRAIN_ALPHA):
    """Initialise NeuMF from a trained GMF and a trained MLP (He et al. 2017, §3.4.1): their embeddings
    and tower, and an output layer that concatenates theirs weighted alpha and 1 - alpha, so that
    NeuMF's first logits are alpha * GMF's + (1 - alpha) * MLP's."""
    assert neumf.model == "neumf" and gmf.model == "gmf" and mlp.model == "mlp"
    mf = neumf.mf_dim
    for side in ("user_embed", "item_embed"):
        getattr(neumf, side).weight[:, :mf] = getattr(gmf, side).weight
        getattr(neumf, side).weight[:, mf:] = getattr(mlp, side).weight
    neumf.mlp.load_state_dict(mlp.mlp.state_dict())
    neumf.final.weight[:, :mf] = alpha * gmf.final.weight
    neumf.final.weight[:, mf:] = (1 - alpha) * mlp.final.weight
    neumf.final.bias[:] = alpha * gmf.final.bias + (1 - alpha) * mlp.final.bias


def build_model(config, device):
    """NeuMF from its config (a ModelConfig, or the dict checkpoints store) on `device`. The one place the CPU
    kernels are chosen: on a CPU they compute the same functions faster (benchmarks/README.md)."""
    config = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    model = NeuMF(**asdict(config)).to(device)
    model.cpu_kernels = torch.device(device).type == "cpu"
    return model
