"""The conversion spec: what a conversion did, typed, versioned, and replayable.

A :class:`ConversionSpec` records everything needed to rebuild a converted model without
pickling code: where the model came from (a tagged :data:`Source`), how it was converted (pool,
placement, options), what the passes found (the sites), and what the weights are (which
parameters are new). :func:`gfgp_cli.convert` attaches one to every model it returns;
:mod:`gfgp_cli.checkpoint` writes it with :meth:`ConversionSpec.to_dict` and reads it with
:meth:`ConversionSpec.from_dict` (the only writer and the only reader of the plain form), and
replays it to rebuild the model.

Plain form (what a checkpoint's ``"spec"`` entry holds; primitives, tuples and lists only, so it
loads with ``torch.load(weights_only=True)``)::

    {"version": 4,
     "source": {"kind": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10},
                "weights_backbone": None},
     "task": "classification", "parts": [""],
     "torchvision_version": "0.29.1", "pool": "gfgp", "placement": "paper",
     "activation": "sigmoid", "include_patch_embed": False, "comparison": None,
     "image_size": 224, "in_channels": 3, "frames": None, "weights": None, "new_parameters": None,
     "sites": [{...graph_passes.Site fields...}, ...]}

Versions (bump :data:`SPEC_VERSION` and teach :meth:`ConversionSpec.from_dict` the old form):
    1: the first release: no "version" and no "in_channels" key (always 3); a user's module
       source recorded its class under "class"; a pool given as a callable was not recorded.
    2: typed spec: "version", "in_channels", module source under "qualname", pool "custom"
       for a callable pool (its name under "pool_name").
    3: every torchvision task: "task" (classification before), "parts" (the converted
       submodules of a model torch.fx cannot trace whole; [""] before: the whole model), and
       a torchvision source's "weights_backbone" (None before).
    4: video models: "frames", the example clip's length T (None before, and for image models);
       sites of 3-D ops have (t, h, w) triples.
    5: timm models and a user's factory: source kinds "timm" (``{"kind": "timm", "name":
       "resnet50.a1_in1k", "kwargs": {...}}``) and "factory" (``{"kind": "factory", "target":
       "package.module:function", "kwargs": {...}}``); the other fields are those of 4.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Type, Union

from torch import nn
from torch.fx import GraphModule

from graph_passes import Site

from . import choices
from .errors import BadInputError

__all__ = [
    "SPEC_VERSION", "ConversionSpec", "Source", "TorchvisionSource", "TimmSource", "FactorySource", "ModuleSource",
    "SOURCE_KINDS",
    "CUSTOM_POOL", "spec_of", "attach_spec", "SpecError", "spec_error",
]

#: Version of the spec's plain form written by this code (see the module docstring).
SPEC_VERSION = 5

#: ``ConversionSpec.pool`` for a pool given as a callable (it cannot be replayed by name).
CUSTOM_POOL = "custom"

# Keyword options of the conversion itself: a torchvision source's constructor arguments are
# passed next to them when the spec is replayed, so they may not use these names.
_CONVERSION_OPTIONS = frozenset({"pool", "placement", "weights", "weights_backbone", "activation", "include_patch_embed",
                                 "image_size", "in_channels", "frames", "comparison", "seed", "measure", "task"})

# The attribute of a converted model that holds its spec (GraphModule.meta is torch.fx's place
# for such annotations; it survives deepcopy and re-compiles).
_META_KEY = "gfgp_spec"


class SpecError(BadInputError):
    """A checkpoint's conversion spec that cannot be read or replayed (exit 2, one line)."""


def spec_error(problem: str) -> SpecError:
    """The error of a spec that is invalid because of ``problem`` (a field and what is wrong
    with it; the checkpoint layer uses it for a spec that reads but does not replay)."""
    return SpecError(f"the checkpoint's conversion spec is invalid: {problem}; re-convert the model with `gfgp convert`")


def _damaged(what: str) -> SpecError:
    return spec_error(f"damaged ({what})")


# Values shown in messages: short, one line, safe for any depth of nesting.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    return " ".join(_REPR.repr(value).split())  # a tensor's repr has line breaks


# ---------------------------------------------------------------------------------------------
# Sources: where the model came from (a tagged value; each kind has its own dataclass)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionSource:
    """A torchvision model built by name: ``torchvision.models.get_model(name, **kwargs)``.

    ``weights_backbone`` records the backbone weights a detection or segmentation model was
    built with (None: random); a replay builds without them (the checkpoint holds the weights).
    """

    kind: ClassVar[str] = "torchvision"
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights_backbone: Optional[str] = None

    def describe(self) -> str:
        return self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "kwargs": dict(self.kwargs), "weights_backbone": self.weights_backbone}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "TorchvisionSource":
        """Read the plain form: a model name, constructor arguments of plain values (see
        :func:`_check_plain`) that are not conversion options, a backbone weights name or None."""
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise _damaged("its torchvision source has no model name")
        if not name.isidentifier():  # every torchvision model name is one
            raise _damaged(f"source.name {_show(name)} is not a torchvision model name")
        kwargs = _constructor_kwargs(data, name)
        weights_backbone = data.get("weights_backbone")
        if weights_backbone is not None and not isinstance(weights_backbone, str):
            raise _damaged(f"weights_backbone of {name} is not a name")
        return cls(name, kwargs, weights_backbone)


def _constructor_kwargs(data: Mapping[str, Any], name: str) -> Dict[str, Any]:
    """A source's ``kwargs``: a dict of identifiers to plain values, none a conversion option."""
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise _damaged(f"the constructor arguments of {name} are not a dict of names (source.kwargs is "
                       f"{_show(kwargs)})")
    taken = sorted(set(kwargs) & _CONVERSION_OPTIONS)
    if taken:
        raise _damaged(f"constructor arguments {taken} of {name} are conversion options")
    for key, value in kwargs.items():
        _check_plain(value, f"source.kwargs[{key!r}] of {name}")
    return dict(kwargs)


#: How ``gfgp convert`` and :func:`gfgp_cli.convert` spell a timm model: ``timm:NAME``, where
#: NAME is timm's model name, optionally with a pretrained tag (``resnet50.a1_in1k``).
TIMM_PREFIX = "timm:"
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
# A factory: ``package.module:function`` (the attribute may be dotted: ``pkg.mod:Class.build``).
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def is_timm_name(text: str) -> bool:
    """Whether ``text`` is ``timm:NAME`` with a well-formed NAME."""
    return text.startswith(TIMM_PREFIX) and _TIMM_NAME.fullmatch(text[len(TIMM_PREFIX):]) is not None


def is_factory_target(text: str) -> bool:
    """Whether ``text`` is ``package.module:function`` (and not ``timm:NAME``)."""
    return not text.startswith(TIMM_PREFIX) and _FACTORY.fullmatch(text) is not None


@dataclass(frozen=True)
class TimmSource:
    """A timm model built by name: ``timm.create_model(name, pretrained=False, **kwargs)``.

    ``name`` may carry timm's pretrained tag (``resnet50.a1_in1k``); a replay builds without
    pretrained weights (the checkpoint holds the weights).
    """

    kind: ClassVar[str] = "timm"
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return TIMM_PREFIX + self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "TimmSource":
        name = data.get("name")
        if not isinstance(name, str) or not is_timm_name(TIMM_PREFIX + name):
            raise _damaged(f"source.name {_show(name)} is not a timm model name")
        return cls(name, _constructor_kwargs(data, TIMM_PREFIX + name))


@dataclass(frozen=True)
class FactorySource:
    """A user's factory: ``target`` is ``package.module:function``, called as ``function(**kwargs)``
    to build the model (a replay imports and calls it again)."""

    kind: ClassVar[str] = "factory"
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return self.target

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "FactorySource":
        target = data.get("target")
        if not isinstance(target, str) or not is_factory_target(target):
            raise _damaged(f"source.target {_show(target)} is not package.module:function")
        return cls(target, _constructor_kwargs(data, target))


@dataclass(frozen=True)
class ModuleSource:
    """A user's own ``nn.Module`` instance; ``qualname`` is its class (``package.module.Class``).

    The spec cannot rebuild the user's code: loading needs an instance (``load(path, module=...)``).
    """

    kind: ClassVar[str] = "module"
    qualname: str

    @classmethod
    def of(cls, module: nn.Module) -> "ModuleSource":
        return cls(f"{type(module).__module__}.{type(module).__qualname__}")

    def describe(self) -> str:
        return self.qualname

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "qualname": self.qualname}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], version: int) -> "ModuleSource":
        qualname = data.get("class" if version == 1 else "qualname")
        if not isinstance(qualname, str) or not qualname:
            raise _damaged("its module source has no class name")
        return cls(qualname)


#: A model source. A new kind is a new dataclass with a ``kind`` tag and
#: ``describe``/``to_dict``/``from_dict``, added here and to :data:`SOURCE_KINDS`.
Source = Union[TorchvisionSource, TimmSource, FactorySource, ModuleSource]

#: Mapping from the plain form's ``"kind"`` tag to the source class that reads it.
SOURCE_KINDS: Dict[str, Type[Any]] = {cls.kind: cls for cls in (TorchvisionSource, TimmSource, FactorySource, ModuleSource)}


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConversionSpec:
    """One conversion, recorded (frozen: change it with :meth:`replace`).

    Attributes:
        source: where the model came from (:class:`TorchvisionSource`, :class:`TimmSource`,
            :class:`FactorySource` or :class:`ModuleSource`).
        pool: the pool name (one of ``gfgp_cli.choices.POOLS``), or :data:`CUSTOM_POOL` for a
            callable, whose ``__name__`` is ``pool_name``.
        placement, activation, include_patch_embed, comparison: the conversion options.
        image_size, in_channels: the example input ``Tensor[2, in_channels, image_size,
            image_size]`` that shape propagation saw (and the size the model was converted for).
        frames: a video model's example clip length T (the example is ``Tensor[2, in_channels,
            frames, image_size, image_size]``); None for image models.
        weights: the weights loaded before converting (a torchvision weights name or a file),
            or None when the model starts from random weights.
        new_parameters: names of the parameters that did not come from ``weights`` (the
            conversion's new layers, a re-built classifier); None without ``weights``.
        sites: every downsampling site the passes found (``graph_passes.Site``), converted or not;
            in a model converted part by part, qualnames are the model's (``backbone.body.conv1``).
        task: the torchvision task family (``gfgp_cli.choices.TASKS``): what the model takes
            and returns; ``"classification"`` for a user's module (a ``Tensor[N, C, H, W]``).
        parts: qualified names of the converted submodules when torch.fx could not trace the
            whole model (``("backbone",)``); ``("",)`` when it could.
        torchvision_version: the torchvision that built the model (replaying it elsewhere must
            find the same sites).
    """

    source: Source
    pool: str
    placement: str
    activation: str
    image_size: int
    sites: Tuple[Site, ...]
    torchvision_version: str
    in_channels: int = 3
    frames: Optional[int] = None
    task: str = "classification"
    parts: Tuple[str, ...] = ("",)
    include_patch_embed: bool = False
    comparison: Optional[str] = None
    weights: Optional[str] = None
    new_parameters: Optional[Tuple[str, ...]] = None
    pool_name: Optional[str] = None

    @property
    def model_name(self) -> str:
        """The model, readable: a torchvision name or the user's class."""
        return self.source.describe()

    @property
    def replayable_pool(self) -> bool:
        """Whether the pool can be rebuilt by name (False for a callable pool)."""
        return self.pool != CUSTOM_POOL

    def replace(self, **changes: Any) -> "ConversionSpec":
        return dataclasses.replace(self, **changes)

    # -- the plain form (the only writer and the only reader) --------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The plain form of the current :data:`SPEC_VERSION` (see the module docstring)."""
        return {
            "version": SPEC_VERSION,
            "source": self.source.to_dict(),
            "torchvision_version": self.torchvision_version,
            "pool": self.pool,
            "pool_name": self.pool_name,
            "placement": self.placement,
            "activation": self.activation,
            "include_patch_embed": self.include_patch_embed,
            "comparison": self.comparison,
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "frames": self.frames,
            "task": self.task,
            "parts": list(self.parts),
            "weights": self.weights,
            "new_parameters": None if self.new_parameters is None else list(self.new_parameters),
            "sites": [s.as_dict() for s in self.sites],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "ConversionSpec":
        """Read any version's plain form; raise BadInputError (one line, naming the field) when it
        is damaged or edited.

        Every field is checked for its type and range before anything is built from it: strings
        are strings, ints are ints (not bools) and sizes positive, names are one of their choices
        (pool, placement, activation, comparison, task), constructor arguments are plain values
        that are not conversion options, and each site is a record of ``graph_passes.Site``'s
        fields. Keys this version does not know are ignored. Whether the model the spec names
        can be built in this process's memory is checked by the replay, before it builds
        anything (:func:`gfgp_cli.conversion.check_fits_in_memory`).
        """
        if not isinstance(data, Mapping):
            raise spec_error(f"missing (the 'spec' entry must be a dict, got {_show(data)})")
        version = data.get("version", 1)  # the first release wrote no version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _damaged(f"version {_show(version)}")
        if version > SPEC_VERSION:
            raise BadInputError(
                f"the checkpoint's conversion spec has version {version}, newer than this gfgp understands "
                f"({SPEC_VERSION}); upgrade gfgp"
            )
        source = _source(data, version)
        task = _task(data)
        frames = _optional_positive_int(data, "frames")
        if frames is not None and task != "video":
            raise _damaged(f"frames is {frames} for a {task} model; only video models have frames")
        return cls(
            source=source,
            pool=_choice(data, "pool", (*choices.POOLS, CUSTOM_POOL)),
            pool_name=_optional_text(data, "pool_name"),
            placement=_choice(data, "placement", choices.PLACEMENTS),
            activation=_choice(data, "activation", choices.ACTIVATIONS, default="sigmoid"),
            include_patch_embed=_flag(data, "include_patch_embed", False),
            comparison=_optional_choice(data, "comparison", choices.COMPARISON_MODULES),
            image_size=_positive_int(data, "image_size"),
            in_channels=_positive_int(data, "in_channels", 3),
            frames=frames,
            task=task,
            parts=_parts(data),
            weights=_optional_text(data, "weights"),
            new_parameters=_optional_names(data, "new_parameters"),
            sites=_sites(data),
            torchvision_version=_text(data, "torchvision_version", "unknown"),
        )


# ---------------------------------------------------------------------------------------------
# Reading the plain form: one checker per kind of field (each names the field it refuses)
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _get(data: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """``data[key]``; a missing key without a default makes the spec incomplete."""
    if key in data:
        return data[key]
    if default is _MISSING:
        raise spec_error(f"incomplete (missing {key!r})")
    return default


def _source(data: Mapping[str, Any], version: int) -> Source:
    source_data = _get(data, "source")
    if not isinstance(source_data, Mapping):
        raise _damaged(f"source must be a dict, got {_show(source_data)}")
    kind = _get(source_data, "kind")
    if not isinstance(kind, str) or kind not in SOURCE_KINDS:
        raise spec_error(f"unknown source kind {_show(kind)} (one of: {', '.join(SOURCE_KINDS)})")
    source: Source = SOURCE_KINDS[kind].from_dict(source_data, version)
    return source


def _text(data: Mapping[str, Any], key: str, default: Any = _MISSING) -> str:
    value = _get(data, key, default)
    if not isinstance(value, str):
        raise _damaged(f"{key} must be a string, got {_show(value)}")
    return value


def _optional_text(data: Mapping[str, Any], key: str) -> Optional[str]:
    return None if data.get(key) is None else _text(data, key)


def _choice(data: Mapping[str, Any], key: str, options: Sequence[str], default: Any = _MISSING) -> str:
    value = _text(data, key, default)
    if value not in options:
        raise _damaged(f"unknown {key} {_show(value)}; one of: {', '.join(options)}")
    return value


def _optional_choice(data: Mapping[str, Any], key: str, options: Sequence[str]) -> Optional[str]:
    return None if data.get(key) is None else _choice(data, key, options)


def _flag(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _get(data, key, default)
    if not isinstance(value, bool):
        raise _damaged(f"{key} must be True or False, got {_show(value)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(data: Mapping[str, Any], key: str, default: Any = _MISSING) -> int:
    """``data[key]`` as a positive int; a string, a bool or a float is damage, not a value."""
    value = _get(data, key, default)
    if not _is_int(value) or value < 1:
        raise _damaged(f"{key} must be a positive integer, got {_show(value)}")
    return int(value)


def _optional_positive_int(data: Mapping[str, Any], key: str) -> Optional[int]:
    return None if data.get(key) is None else _positive_int(data, key)


def _optional_names(data: Mapping[str, Any], key: str) -> Optional[Tuple[str, ...]]:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _damaged(f"{key} must be a list of parameter names, got {_show(value)}")
    return tuple(value)


def _task(data: Mapping[str, Any]) -> str:
    task = data.get("task", "classification")
    if not isinstance(task, str) or task not in choices.TASKS:
        raise _damaged(f"unknown task {_show(task)}; one of: {', '.join(choices.TASKS)}")
    return task


def _parts(data: Mapping[str, Any]) -> Tuple[str, ...]:
    parts = data.get("parts", [""])
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, str) for p in parts):
        raise _damaged("parts must be a non-empty list of module names")
    return tuple(parts)


# Constructor arguments are literals (``gfgp convert --kwarg key=value``): scalars, and lists,
# tuples and dicts of them, nested at most this deep.
_PLAIN_SCALARS = (type(None), bool, int, float, str)
_PLAIN_DEPTH = 4


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Refuse (naming ``where``) a value that is not plain data: a tensor, an object, deep nesting."""
    if type(value) in _PLAIN_SCALARS:
        return
    if depth < _PLAIN_DEPTH and type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", depth + 1)
        return
    if depth < _PLAIN_DEPTH and type(value) is dict and all(isinstance(k, str) for k in value):
        for k, item in value.items():
            _check_plain(item, f"{where}[{k!r}]", depth + 1)
        return
    raise _damaged(f"{where} must be a plain value (None, a bool, int, float or string, or a list, tuple or dict "
                   f"of them, at most {_PLAIN_DEPTH} deep), got {type(value).__name__} {_show(value)}")


_SITE_KINDS = ("conv", "max_pool", "avg_pool", "skip")
_SITE_TEXT = ("node", "qualname", "kind", "reason")
_SITE_FLAGS = ("ceil_mode", "convert", "count_include_pad", "same_padding")
_SITE_GEOMETRY = ("kernel", "stride", "padding", "dilation")  # (h, w) or (t, h, w), one length
_SITE_SHAPES = ("in_shape", "out_shape")


def _sites(data: Mapping[str, Any]) -> Tuple[Site, ...]:
    sites = _get(data, "sites")
    if not isinstance(sites, (list, tuple)):
        raise _damaged(f"sites must be a list of site records, got {_show(sites)}")
    return tuple(_site(record, f"sites[{i}]") for i, record in enumerate(sites))


def _site(record: Any, where: str) -> Site:
    """One ``graph_passes.Site`` from its record, every field checked (lists become tuples)."""
    if not isinstance(record, Mapping) or not all(isinstance(k, str) for k in record):
        raise _damaged(f"{where} must be a record of site fields, got {_show(record)}")
    try:
        site = Site(**record)  # names the field that is missing or unknown
    except TypeError as e:
        detail = str(e).encode("unicode_escape").decode("ascii")[:160]  # a field name may hold a line break
        raise _damaged(f"TypeError: {where}: {detail}") from e
    for key in _SITE_TEXT:
        if not isinstance(getattr(site, key), str):
            raise _damaged(f"{where}.{key} must be a string, got {_show(getattr(site, key))}")
    if site.kind not in _SITE_KINDS:
        raise _damaged(f"{where}.kind {_show(site.kind)} is not one of {', '.join(_SITE_KINDS)}")
    if not _is_int(site.channels) or site.channels < 0:
        raise _damaged(f"{where}.channels must be a non-negative integer, got {_show(site.channels)}")
    for key in _SITE_FLAGS:
        if not isinstance(getattr(site, key), bool):
            raise _damaged(f"{where}.{key} must be True or False, got {_show(getattr(site, key))}")
    kernel, stride, padding, dilation, in_shape, out_shape = (
        _int_tuple(getattr(site, key), f"{where}.{key}") for key in _SITE_GEOMETRY + _SITE_SHAPES)
    if len({len(kernel), len(stride), len(padding), len(dilation)}) != 1 or not 1 <= len(kernel) <= 3:
        raise _damaged(f"{where}: kernel, stride, padding and dilation must be pairs or triples of one length")
    return dataclasses.replace(site, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                               in_shape=in_shape, out_shape=out_shape)


def _int_tuple(value: Any, where: str) -> Tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > 8 or not all(_is_int(v) and v >= 0 for v in value):
        raise _damaged(f"{where} must be a short tuple of non-negative integers, got {_show(value)}")
    return tuple(int(v) for v in value)


# ---------------------------------------------------------------------------------------------
# The spec on a converted model
# ---------------------------------------------------------------------------------------------


def spec_of(model: nn.Module) -> ConversionSpec:
    """The spec :func:`gfgp_cli.convert` attached to ``model`` (unwraps DDP and torch.compile)."""
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile's wrapper
    meta = getattr(inner, "meta", None)
    spec = meta.get(_META_KEY) if isinstance(meta, dict) else None
    if not isinstance(spec, ConversionSpec):
        raise BadInputError(
            f"{type(model).__name__} was not made by gfgp_cli.convert, so it has no conversion spec to save; "
            "convert it first (gfgp_cli.convert(model))"
        )
    return spec


def attach_spec(model: nn.Module, spec: ConversionSpec) -> nn.Module:
    """Record ``spec`` on a converted model; returns the model.

    The spec goes in ``model.meta`` (a GraphModule's, or for a model converted part by part, a
    plain ``meta`` dict gfgp adds to the copy of the model it returns).
    """
    if not isinstance(spec, ConversionSpec):
        raise TypeError(f"attach_spec expects a ConversionSpec, got {type(spec).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_spec records the spec on the model gfgp_cli.convert returns, got {type(model).__name__}")
    meta = model.meta if isinstance(model, GraphModule) else model.__dict__.setdefault("meta", {})
    if not isinstance(meta, dict):
        raise TypeError(f"{type(model).__name__} has a 'meta' attribute that is not a dict; gfgp cannot record its spec")
    meta[_META_KEY] = spec
    return model
