"""NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017), as in NVIDIA's NCF recipe.

A GMF branch (element-wise product of user and item embeddings of size `mf_dim`) and an MLP branch
(concatenated user and item embeddings of size `mlp_layer_sizes[0] / 2` each, then Linear+ReLU layers)
are concatenated and projected to one logit.
"""
import itertools
import math

import torch
from torch import nn


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
        u = self.user_embed(user)
        i = self.item_embed(item)
        gmf = u[:, : self.mf_dim] * i[:, : self.mf_dim]
        x = torch.cat((u[:, self.mf_dim :], i[:, self.mf_dim :]), dim=1)
        for layer in self.mlp:
            x = torch.relu(layer(x))
            if self.dropout > 0:
                x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        x = torch.cat((gmf, x), dim=1)
        # The 1-wide output layer runs in fp32 even under autocast: it costs nothing, and low-precision
        # logits would create ties between candidates that the HR@k rank counts against the model.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.final(x.float()).squeeze(1)


class ItemPopularity(nn.Module):
    """Baseline that scores every item by its number of training positives, whoever the user is.

    Scored by the same evaluation code as NeuMF, it is the bar a trained model must clearly clear.
    """

    def __init__(self, train_items, nb_items):
        super().__init__()
        self.register_buffer("counts", torch.bincount(train_items.long(), minlength=nb_items).float())

    def forward(self, user, item):
        return self.counts[item.long()]
