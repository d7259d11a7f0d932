"""Device names given on the command line (--device): one check and one resolution for all commands."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import BadInputError

__all__ = ["check_device_name", "resolve_device"]


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N; anything else is bad input (exit 2)."""
    if device not in ("auto", "cpu", "cuda") and not (str(device).startswith("cuda:") and str(device)[5:].isdigit()):
        raise BadInputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_device(device: str, local_rank: Optional[int] = None) -> torch.device:
    """``--device`` as a torch.device: auto picks CUDA when present; plain cuda is
    ``cuda:local_rank`` under torchrun (else the current device). A CUDA device that is absent
    is bad input."""
    check_device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BadInputError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    if device == "cuda":
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    dev = torch.device(device)
    if dev.index >= torch.cuda.device_count():
        raise BadInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev
