"""gfgp checkpoints: data, not code (docs/architecture.md).

A checkpoint is a dict of tensors and plain values::

    {"format": "gfgp", "version": 2, "spec": {...ConversionSpec.to_dict()...},
     "state_dict": {...}, ...training state (optimizer, scheduler, epoch, RNG) for runs...}

It loads with ``torch.load(path, weights_only=True)``. This module is the checkpoint layer: it
writes (:func:`write_checkpoint`, :func:`save`), reads (:func:`read_checkpoint`, which turns the
plain spec into a :class:`~gfgp_cli.spec.ConversionSpec`) and replays (:func:`rebuild`,
:func:`load`: the conversion the spec records is run again and the weights are loaded strictly).
Writes are atomic (temporary file in the same folder, fsync, ``os.replace``), so a crash leaves
either the old file or the new one, never a broken one.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ._io import atomic_open, check_output_file
from .conversion import ConversionReport, PoolFactory, convert_with_report
from .errors import BadInputError
from .spec import ConversionSpec, FactorySource, ModuleSource, SpecError, TimmSource, TorchvisionSource, attach_spec, spec_error, spec_of

__all__ = ["FORMAT", "VERSION", "save", "load", "rebuild", "read_checkpoint", "write_checkpoint", "convert_to_file"]

FORMAT = "gfgp"
# version 1: first format (spec + state_dict [+ training state]); the spec a plain dict.
# version 2: the spec is ConversionSpec.to_dict() (it carries its own version; see gfgp_cli.spec).
# Older code refuses a newer file ("newer than this gfgp understands; upgrade gfgp").
VERSION = 2

PathLike = Union[str, os.PathLike]


def write_checkpoint(path: PathLike, spec: ConversionSpec, state_dict: Dict[str, Any], **extra: Any) -> Path:
    """Atomically write a checkpoint: ``spec``, ``state_dict`` and ``extra`` plain entries.

    The one writer of checkpoints (and of the spec's plain form). The parent folder is created if
    missing; see :func:`gfgp_cli._io.atomic_open`.
    """
    if not isinstance(spec, ConversionSpec):
        raise TypeError(f"write_checkpoint expects a ConversionSpec, got {type(spec).__name__}")
    reserved = {"format", "version", "spec", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"extra checkpoint entries may not be named {sorted(reserved)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(), "state_dict": state_dict, **extra}
    with atomic_open(path, "wb") as f:
        torch.save(data, f)
    return path


def read_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a gfgp checkpoint safely (``weights_only=True``; never falls back to unsafe pickle).

    The one reader of checkpoints: every format version loads, and ``data["spec"]`` is returned
    as a :class:`~gfgp_cli.spec.ConversionSpec`. Raises BadInputError (exit 2) with a one-line message for a missing file, a folder, a
    truncated or corrupt file, a pickle that would run code, or a file that is not gfgp's.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"checkpoint {path} does not exist; make one with `gfgp convert MODEL --out {path}`")
    if path.is_dir():
        raise BadInputError(f"checkpoint {path} is a folder; give the path of a .pt file made by gfgp")
    try:
        with warnings.catch_warnings():  # a pickle protocol torch.save does not write: refused below, in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
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
    except Exception as e:  # noqa: BLE001 - the file is untrusted input: any failure to read it is damage
        # (a flipped bit in the pickle reaches torch's weights-only unpickler as TypeError, MemoryError, ...)
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
    try:
        data["spec"] = ConversionSpec.from_dict(data["spec"])
    except BadInputError as e:
        raise BadInputError(f"{path}: {e}") from e
    return data


def save(model: nn.Module, path: PathLike, **extra: Any) -> Path:
    """Save a converted model as a gfgp checkpoint (spec + state_dict [+ ``extra`` entries])."""
    return write_checkpoint(path, spec_of(model), model.state_dict(), **extra)


def rebuild(spec: ConversionSpec, module: Optional[nn.Module] = None, pool: Optional[PoolFactory] = None) -> nn.Module:
    """Replay the conversion ``spec`` records; returns the converted model (fresh weights).

    ``module`` is required for a spec converted from a user's own ``nn.Module`` instance (the
    spec records the conversion, not the user's code; a model converted from
    ``package.module:function`` or ``timm:NAME`` is rebuilt by calling it again), and ``pool`` for one converted with a callable pool.
    The replay must find the same sites as the recorded conversion (a different torchvision, or
    a different module, would silently give a different model).
    """
    source = spec.source
    if spec.replayable_pool:
        if pool is not None:
            raise BadInputError(f"this checkpoint was converted with pool {spec.pool!r}; do not pass pool=")
        pool_arg: Any = spec.pool
    elif pool is None:
        raise BadInputError(
            f"this checkpoint was converted with your own pool factory {spec.pool_name or '(unnamed)'}; "
            "pass it: gfgp_cli.load(path, pool=factory)"
        )
    else:
        pool_arg = pool
    options: Dict[str, Any] = dict(
        pool=pool_arg, placement=spec.placement, activation=spec.activation, include_patch_embed=spec.include_patch_embed,
        image_size=spec.image_size, in_channels=spec.in_channels, frames=spec.frames, comparison=spec.comparison,
        task=spec.task,  # a torchvision name's must agree; a timm, factory or module source's is only recorded here
        weights=None,  # the checkpoint's state_dict holds the weights
    )
    if isinstance(source, (TorchvisionSource, TimmSource, FactorySource)):
        if module is not None:
            raise BadInputError(f"this checkpoint names its model ({source.describe()}); do not pass a module")
        # Everything the replay is given comes from the spec: a refusal is the spec's, except
        # that timm or the user's factory may be missing here (that one says what to install).
        target, kwargs = (source.name, source.kwargs) if isinstance(source, TorchvisionSource) else (source, {})
        try:
            gm = _replay(target, options, kwargs)
        except SpecError:
            raise
        except BadInputError as e:
            if isinstance(source, TorchvisionSource) or not _is_environment_problem(e):
                raise spec_error(" ".join(str(e).split())[:400]) from e
            raise BadInputError(f"cannot rebuild the model this checkpoint records: {e}") from e
        except ValueError as e:  # graph_passes' "shape propagation failed"
            raise spec_error(" ".join(str(e).split())[:400]) from e
    elif isinstance(source, ModuleSource):
        if module is None:
            raise BadInputError(
                f"this checkpoint was converted from your own module {source.qualname}; "
                "pass an instance of it: gfgp_cli.load(path, module=MyModel())"
            )
        gm = _replay(module, options, {})
    else:  # a source kind this code reads but cannot build (kept for kinds added later)
        raise BadInputError(f"cannot rebuild a model from a {type(source).__name__}")
    replayed = spec_of(gm)
    if (replayed.task, replayed.parts) != (spec.task, spec.parts):
        raise spec_error(
            f"it records a {spec.task} model converted in parts {list(spec.parts)}, but replaying it gives a "
            f"{replayed.task} model converted in parts {list(replayed.parts)}"
        )
    if replayed.sites != spec.sites:
        raise BadInputError(
            "replaying the conversion gave different pooling sites than the checkpoint records "
            f"(checkpoint made with torchvision {spec.torchvision_version}, this is {replayed.torchvision_version}); "
            "re-convert the model with this version"
        )
    # The recorded spec, not the replay's: it knows where the weights came from.
    return attach_spec(gm, spec)


def _is_environment_problem(error: BadInputError) -> bool:
    """Whether a replay failed because this environment lacks what the source needs (timm, the
    user's factory module), not because the spec is wrong."""
    text = str(error)
    return "pip install 'gfgp[timm]'" in text or text.startswith(("cannot import ", "importing "))


def load(path: Union[PathLike, Dict[str, Any]], module: Optional[nn.Module] = None,
         map_location: Union[str, torch.device] = "cpu", pool: Optional[PoolFactory] = None) -> nn.Module:
    """Rebuild a converted model from its checkpoint and load its weights strictly (eval mode).

    ``path`` is a checkpoint file, or a checkpoint already read by :func:`read_checkpoint` (so a
    caller that also needs the training state reads the file once). ``module`` is required for
    models converted from a user's own ``nn.Module``, ``pool`` for models converted with a
    callable pool (see :func:`rebuild`); for torchvision models the spec names the model.
    """
    data = path if isinstance(path, dict) else read_checkpoint(path, map_location=map_location)
    path = "the checkpoint" if isinstance(path, dict) else path
    model = rebuild(data["spec"], module=module, pool=pool)
    state = data["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise BadInputError(f"the state_dict in {path} is not a dict of named tensors; re-save the model with gfgp_cli.save")
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise BadInputError(
            f"the weights in {path} do not fit the model its spec rebuilds ({' '.join(str(e).split())[:200]})"
        ) from e
    return model.eval()


def _replay(model: Any, options: Dict[str, Any], kwargs: Dict[str, Any]) -> nn.Module:
    """``convert_with_report(model, **options, **kwargs)``, one line when it fails.

    torch.fx's ShapeProp prints a traceback before it re-raises; a replay that fails raises one
    line instead (the traceback stays on the exception, for ``--debug``), and one that succeeds
    passes on what it printed.
    """
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        gm, _ = convert_with_report(model, **options, **kwargs)
    sys.stderr.write(printed.getvalue())
    return gm


def convert_to_file(model: str, out: Optional[PathLike], *, force: bool = False, dry_run: bool = False,
                    **options: Any) -> ConversionReport:
    """``gfgp convert``: convert a model, measure it, and write its checkpoint.

    The output path is checked before any work (an existing file needs ``force``; its folder is
    created if missing). ``dry_run`` converts and reports without writing.
    """
    if not dry_run:
        if out is None:
            raise BadInputError("give the checkpoint path with --out PATH (or use --dry-run)")
        out = check_output_file(out, force=force, what="--out", example="model.pt")
    gm, report = convert_with_report(model, measure=True, **options)
    if not dry_run:
        save(gm, out)
    return report
