"""Device and precision choice, shared by ncf.py, inference.py and the benchmarks.

Mixed precision is two objects, so training and evaluation loops have no branches: an autocast
context and a GradScaler that is enabled only where the chosen type needs loss scaling.
"""
import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from cli import UserError


def pick_device(flag, index=0):
    """torch.device for --device {auto,cpu,cuda}: auto takes CUDA when available; `index` is the local rank."""
    use_cuda = flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    if index >= torch.cuda.device_count():
        raise UserError(f"local rank {index} has no GPU ({torch.cuda.device_count()} visible): "
                        f"use --nproc_per_node <= {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def memory_bytes(device, free=True):
    """Bytes of `device`'s memory: what it can still allocate (free GPU memory, the host's MemAvailable), or
    with free=False all of it. The one home of the memory checks made before anything large is allocated."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if free else torch.cuda.get_device_properties(device).total_memory
    if free:
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES" if free else "SC_PHYS_PAGES")


def set_matmul_precision(device):
    """The one fp32 matmul setting of training, evaluation and the benchmarks; returns its name.

    On CUDA, fp32 matmuls use TF32 tensor cores, as NVIDIA's recipe and its published A100 figures do
    (NGC containers enable TF32 by default); CPUs have no TF32 and compute true fp32.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return matmul_precision(device)


def matmul_precision(device):
    """The name of the fp32 matmul setting in force on `device`: "TF32" or "fp32"."""
    return "TF32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def cpu_has_native_bf16():
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # None for fp32
    device_type: str

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def grad_scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def choose_precision(opt_level, amp_dtype, device, native_bf16=None):
    """The recipe's --opt_level (O0 fp32, O2 mixed) and --amp_dtype on `device`.

    O2 with amp_dtype auto is fp16 on CUDA (the recipe's choice) and bf16 on a CPU with native bf16
    (`native_bf16`, default: this CPU's); a CPU without it falls back to fp32 with a warning, since
    emulated bf16 is slower there.
    """
    if opt_level == "O0":
        return Precision("fp32", None, device.type)
    if amp_dtype == "auto":
        if device.type == "cuda":
            amp_dtype = "float16"
        elif cpu_has_native_bf16() if native_bf16 is None else native_bf16:
            amp_dtype = "bfloat16"
        else:
            warnings.warn("--opt_level O2: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 is "
                          "slower than fp32; training in fp32. Use --amp_dtype bfloat16 to force bf16.",
                          stacklevel=2)
            return Precision("fp32", None, device.type)
    dtype = getattr(torch, amp_dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--amp_dtype float16 is for CUDA; on CPU use --amp_dtype bfloat16 or auto")
    return Precision({torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype] + " autocast", dtype, device.type)
