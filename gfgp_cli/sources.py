"""Model sources other than torchvision's zoo: timm models by name, and a user's factory.

``gfgp convert`` and :func:`gfgp_cli.convert` take a model as

- a torchvision model name (``resnet50``; :mod:`gfgp_cli.zoo` builds it),
- ``timm:NAME`` (``timm:convnext_atto``, ``timm:resnet50.a1_in1k``): ``timm.create_model``,
- ``package.module:function`` (``mymodels:small_net``): the user's function (or class), called
  with the constructor arguments,
- or an ``nn.Module`` instance.

:func:`parse` turns the text into a :class:`~gfgp_cli.spec.Source` (what the spec records) and
:func:`build` builds a fresh model from it, so a checkpoint of a timm or factory model rebuilds
without the user passing a module. timm is an optional dependency (``pip install 'gfgp[timm]'``).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Dict, Optional

from torch import nn

from .errors import BadInputError
from .spec import TIMM_PREFIX, FactorySource, Source, TimmSource, is_factory_target, is_timm_name

__all__ = ["parse", "build", "is_external", "default_image_size", "PRETRAINED"]

#: ``--weights`` value that loads a timm model's own pretrained weights (its tag's, or the default tag's).
PRETRAINED = "pretrained"


def is_external(text: str) -> bool:
    """Whether ``text`` names a timm model or a factory rather than a torchvision model."""
    return text.startswith(TIMM_PREFIX) or ":" in text


def parse(text: str, kwargs: Dict[str, Any]) -> Source:
    """The source ``timm:NAME`` or ``package.module:function`` names (bad input if malformed)."""
    if text.startswith(TIMM_PREFIX):
        if not is_timm_name(text):
            raise BadInputError(f"{text!r} is not a timm model name; write timm:NAME, e.g. timm:resnet18 or "
                                "timm:resnet50.a1_in1k")
        return TimmSource(text[len(TIMM_PREFIX):], dict(kwargs))
    if not is_factory_target(text):
        raise BadInputError(f"{text!r} is neither a torchvision model name, timm:NAME nor package.module:function "
                            "(e.g. mymodels:small_net)")
    return FactorySource(text, dict(kwargs))


def build(source: Source, pretrained: bool = False) -> nn.Module:
    """A fresh model from a timm or factory source (``pretrained``: timm's own weights)."""
    if isinstance(source, TimmSource):
        return _build_timm(source, pretrained)
    if isinstance(source, FactorySource):
        if pretrained:
            raise BadInputError(f"--weights {PRETRAINED} is for timm models; give {source.target} a state_dict file "
                                "(--weights FILE), or load the weights in your factory")
        return _build_factory(source)
    raise TypeError(f"sources.build builds timm and factory sources, not {type(source).__name__}")


def default_image_size(model: nn.Module) -> Optional[int]:
    """The input size a timm model was made for (its pretrained config), or None."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if isinstance(size, (tuple, list)) and size and isinstance(size[-1], int) else None


def _timm():
    try:
        import timm
    except ImportError as e:
        raise BadInputError("timm models need timm, which is not installed; install it with pip install 'gfgp[timm]'") from e
    return timm


def _build_timm(source: TimmSource, pretrained: bool) -> nn.Module:
    timm = _timm()
    if not timm.is_model(source.name):
        from .choices import unknown

        base = source.name.split(".")[0]
        raise unknown("timm model", base, timm.list_models()) from None
    try:
        return timm.create_model(source.name, pretrained=pretrained, **source.kwargs)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, AttributeError, IndexError) as e:
        if pretrained:
            raise BadInputError(
                f"cannot load timm's pretrained weights of {source.name} ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:160]}); put them in the Hugging Face cache (HF_HOME), or pass a "
                "state_dict file with --weights FILE") from e
        raise BadInputError(f"cannot build timm:{source.name} with {dict(source.kwargs)}: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from e
    except OSError as e:  # huggingface_hub: no network, no cached file
        raise BadInputError(
            f"cannot load timm's pretrained weights of {source.name} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:160]}); download them where there is network (they go to the Hugging Face "
            "cache, HF_HOME), or pass a state_dict file with --weights FILE") from e


def _import(module_name: str, target: str):
    """Import the factory's module; the working folder counts as on the path (as for ``python -m``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = module_name.split(".")[0]
        if e.name == top and cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
        raise BadInputError(
            f"cannot import {module_name} for the model {target} ({e}); run gfgp from the folder that holds it, "
            "add that folder to PYTHONPATH, or pip install its package") from e
    except Exception as e:  # noqa: BLE001 - the user's module failing at import is their input's problem
        raise BadInputError(f"importing {module_name} for the model {target} failed: {type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}") from e


def _factory(target: str):
    """The callable ``package.module:function`` names; refuses what is not a model factory."""
    module_name, _, attr = target.partition(":")
    if module_name.split(".")[0] in sys.stdlib_module_names or module_name == "builtins":
        # A checkpoint is data: one that names os:system must not run it when it is loaded.
        raise BadInputError(f"{target} is in Python's standard library, not a model factory; name your own function "
                            "that returns an nn.Module")
    obj: Any = _import(module_name, target)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise BadInputError(f"{module_name} has no {attr} (the model {target}); check the name after the colon") from None
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module))):
        raise BadInputError(f"{target} is a {type(obj).__name__}, not a function or nn.Module class that builds a model")
    return obj


def _build_factory(source: FactorySource) -> nn.Module:
    fn = _factory(source.target)
    try:
        inspect.signature(fn).bind(**source.kwargs)
    except TypeError as e:
        raise BadInputError(f"{source.target} does not take the arguments {sorted(source.kwargs)} ({e})") from e
    except ValueError:  # no signature to check (a builtin): the call says
        pass
    try:
        model = fn(**source.kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory refusing its arguments is bad input
        raise BadInputError(f"{source.target}({', '.join(f'{k}={v!r}' for k, v in source.kwargs.items())}) failed: "
                            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    if not isinstance(model, nn.Module):
        raise BadInputError(f"{source.target} returned a {type(model).__name__}, not an nn.Module")
    return model
