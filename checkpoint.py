"""Checkpoints shared by ncf.py and inference.py: atomic save, safe load with checks, payloads, RNG states.

model.pth holds the unwrapped model of the best epoch and everything needed to rebuild it (its config,
the epoch, its figures, the run's flags and the dataset's identity); last.pth adds the optimizer, the loss
scaler, the run's progress and every rank's RNG state, for --resume.
"""
import os
import warnings

import torch

from cli import UserError


def safe_load(path, what, fix):
    """torch.load restricted to tensors and plain data (weights_only), with one-line user errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist: {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter would add stderr lines
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or a pickle that runs code
        text = str(err).strip()
        if "Weights only load failed" in text:
            reason = "it holds Python objects, not just tensors and plain data, and is not loaded for safety"
        else:
            reason = text.splitlines()[0][:200] if text else type(err).__name__
        raise UserError(f"cannot load {what} {path} ({reason}): {fix}") from None


