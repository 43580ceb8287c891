"""NeuMF's shape: the recipe's defaults, the three models (NeuMF and its two branches alone), and the frozen
config that checks a shape once and converts to and from the dict checkpoints store (as nanoGPT's GPTConfig
beside its GPT). No torch: a config is checked before any model is built.
"""
from dataclasses import asdict, dataclass

# The recipe's model defaults (ncf.py's --factors, --layers and --dropout).
FACTORS = 64
LAYERS = (256, 256, 128, 64)
DROPOUT = 0.5
MODELS = ("neumf", "gmf", "mlp")


def branch_widths(mf_dim, mlp_layer_sizes, model):
    """(mf_dim, mlp_layer_sizes) of a `model` of these flags: the branch left out has width 0."""
    return (0 if model == "mlp" else mf_dim), (() if model == "gmf" else tuple(mlp_layer_sizes))


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape, checked once (ValueError naming the field). `as_dict()` is the "config" checkpoints
    store, in the recipe's argument names (NeuMF's without a "model" key, as before the branches existed)."""

    nb_users: int
    nb_items: int
    mf_dim: int = FACTORS
    mlp_layer_sizes: tuple = LAYERS
    dropout: float = DROPOUT
    model: str = "neumf"

    def __post_init__(self):
        mf_dim, layers = branch_widths(self.mf_dim, self.mlp_layer_sizes, self.model)  # the branch left out: 0 wide
        object.__setattr__(self, "mf_dim", mf_dim)
        object.__setattr__(self, "mlp_layer_sizes", layers)
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if not all(type(size) is int for size in (self.nb_users, self.nb_items, mf_dim, *layers)):
            raise ValueError(f"sizes must be integers: {self}")
        if min(self.nb_users, self.nb_items) <= 0 or (mf_dim <= 0) != (self.model == "mlp"):
            raise ValueError(f"nb_users, nb_items and mf_dim must be positive: {self}")
        if any(size <= 0 for size in layers) or (not layers) != (self.model == "gmf"):
            raise ValueError(f"mlp_layer_sizes must be positive sizes, got {list(layers)}")
        if layers and layers[0] % 2:
            raise ValueError(f"mlp_layer_sizes[0] is split between user and item embeddings, so it must be even, "
                             f"got {layers[0]}")
        if type(self.dropout) not in (int, float) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @classmethod
    def from_dict(cls, config):
        """The config a checkpoint stores, checked; ValueError when it is not one."""
        if not isinstance(config, dict) or not {"nb_users", "nb_items"} <= set(config) <= set(cls.__annotations__):
            raise ValueError(f"not a model config: {str(config)[:120]}")
        try:
            return cls(**config)
        except TypeError as err:  # a size that is no number at all, such as a layers value of 3
            raise ValueError(str(err)) from None

    def as_dict(self):
        config = {**asdict(self), "mlp_layer_sizes": list(self.mlp_layer_sizes)}
        if self.model == "neumf":
            del config["model"]
        return config
