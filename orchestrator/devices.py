"""Device, dtype and memory for the model backends (torch imported lazily, so
nothing here needs the ``models`` extra until a model backend is configured)."""
from __future__ import annotations

import os
import resource
from typing import Any

from orchestrator.errors import GenerationError

__all__ = ["offline", "resolve_device", "resolve_dtype", "memory_report"]


def offline() -> None:
    """Nothing is ever downloaded at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"MODEL_DEVICE={setting} but CUDA is not available")
    return setting


def resolve_dtype(setting: str, device: str) -> Any:
    """``auto``: bfloat16 on CUDA when supported, else float16; float32 on CPU."""
    import torch

    if setting == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, setting)


def memory_report(device: str) -> dict[str, Any]:
    """Memory in use now and at peak: the GPU's for CUDA, the process's RSS otherwise."""
    import torch

    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        free, total = torch.cuda.mem_get_info(idx)
        return {"allocated_bytes": int(torch.cuda.memory_allocated(idx)),
                "peak_bytes": int(torch.cuda.max_memory_allocated(idx)),
                "free_bytes": int(free), "total_bytes": int(total)}
    return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
