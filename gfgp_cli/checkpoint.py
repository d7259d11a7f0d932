"""gfgp checkpoints: data, not code (DESIGN.md).

A checkpoint is a dict of tensors and plain values::

    {"format": "gfgp", "version": 1, "spec": {...conversion spec, primitives only...},
     "state_dict": {...}, ...training state (optimizer, scheduler, epoch, RNG) for runs...}

It loads with ``torch.load(path, weights_only=True)``; :func:`load` rebuilds the model by
replaying the conversion recorded in ``spec`` and loads the weights strictly. Writes are atomic
(temporary file in the same folder, fsync, ``os.replace``), so a crash leaves either the old file
or the new one, never a broken one.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ._io import atomic_open
from .errors import BadInputError

__all__ = ["FORMAT", "VERSION", "save", "load", "read_checkpoint", "write_checkpoint", "get_spec", "set_spec"]

FORMAT = "gfgp"
# version 1: first format (spec + state_dict [+ training state]).
VERSION = 1

PathLike = Union[str, os.PathLike]


def get_spec(model: nn.Module) -> Dict[str, Any]:
    """The conversion spec recorded on a model converted by :func:`gfgp_cli.convert`."""
    spec = getattr(model, "meta", {}).get("gfgp_spec") if hasattr(model, "meta") else None
    if spec is None:
        raise BadInputError(
            f"{type(model).__name__} was not made by gfgp_cli.convert, so it has no conversion spec to save; "
            "convert it first (gfgp_cli.convert(model))"
        )
    return spec


def set_spec(model: nn.Module, spec: Dict[str, Any]) -> None:
    """Record the conversion spec on a converted model (a GraphModule's ``meta`` dict)."""
    model.meta["gfgp_spec"] = spec


def write_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Atomically write ``payload`` (plus format and version keys) to ``path``.

    The parent folder is created if missing; see :func:`gfgp_cli._io.atomic_open`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_open(path, "wb") as f:
        torch.save(data, f)
    return path


def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a gfgp checkpoint safely (``weights_only=True``; never falls back to unsafe pickle).

    Raises BadInputError (exit 2) with a one-line message for a missing file, a folder, a
    truncated or corrupt file, a pickle that would run code, or a file that is not gfgp's.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"checkpoint {path} does not exist; make one with `gfgp convert MODEL --out {path}`")
    if path.is_dir():
        raise BadInputError(f"checkpoint {path} is a folder; give the path of a .pt file made by gfgp")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names what it refused: "Unsupported global: GLOBAL x.y"
        # for an object whose loading would call code; anything else is a damaged file.
        detail = str(e)[str(e).find("WeightsUnpickler error:"):].split("\n")[0].removeprefix("WeightsUnpickler error:")
        if "Unsupported global" not in detail:
            raise BadInputError(f"cannot read checkpoint {path}: the file is corrupt or truncated") from e
        refused = detail.split(" was not an allowed global")[0].strip()
        raise BadInputError(
            f"refused to load {path}: it is not a plain-data checkpoint and loading it would run code "
            f"({refused}); gfgp checkpoints hold only tensors and plain values"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise BadInputError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({type(e).__name__})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadInputError(f"{path} is not a gfgp checkpoint (no 'format': 'gfgp' entry); make one with `gfgp convert`")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise BadInputError(
            f"{path} has checkpoint version {data.get('version')!r}, newer than this gfgp understands ({VERSION}); upgrade gfgp"
        )
    for key in ("spec", "state_dict"):
        if not isinstance(data.get(key), dict):
            raise BadInputError(f"{path} is not a complete gfgp checkpoint: its '{key}' entry is missing")
    return data


def save(model: nn.Module, path: PathLike, **extra: Any) -> Path:
    """Save a converted model as a gfgp checkpoint (spec + state_dict [+ ``extra`` entries])."""
    return write_checkpoint(path, {"spec": get_spec(model), "state_dict": model.state_dict(), **extra})


def load(path: Union[PathLike, Dict[str, Any]], module: Optional[nn.Module] = None,
         map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild a converted model from its checkpoint and load its weights strictly (eval mode).

    ``path`` is a checkpoint file, or a checkpoint already read by :func:`read_checkpoint` (so a
    caller that also needs the training state reads the file once). ``module`` is required for
    models converted from a user's own ``nn.Module`` (the spec records the conversion, not the
    user's code); for torchvision models the spec names the model.
    """
    from .convert import build_from_spec

    data = path if isinstance(path, dict) else read_checkpoint(path, map_location=map_location)
    path = "the checkpoint" if isinstance(path, dict) else path
    model = build_from_spec(data["spec"], module=module)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as e:
        raise BadInputError(
            f"the weights in {path} do not fit the model its spec rebuilds ({' '.join(str(e).split())[:200]})"
        ) from e
    return model.eval()
