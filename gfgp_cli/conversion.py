"""Convert a model to GFGP pooling: resolve the model, run the graph passes, record a spec.

``convert`` reads top to bottom as the pipeline of docs/architecture.md::

    model  = build the torchvision model (any task, gfgp_cli.zoo) or deep-copy the user's module;
             load --weights
    gm     = graph_passes.trace(model)   # or, if torch.fx cannot trace it whole, each largest
                                         # traceable part of it (graph_passes.convert_parts)
    sites  = graph_passes.find_sites(gm, example)                 # strided convs, max/avg pools
    gm     = graph_passes.decompose(gm, sites)                   # conv(stride s) -> conv(1); skip(s)
    gm, placed   = graph_passes.move_pools(gm, placement)        # local | exact | paper
    gm, replaced = graph_passes.replace_pools(gm, POOLS[pool](...))  # skip/max/avg pools -> GFGP

The :class:`~gfgp_cli.spec.ConversionSpec` attached to the result (:func:`gfgp_cli.spec.spec_of`)
records the conversion, so :mod:`gfgp_cli.checkpoint` can rebuild the model by replaying this
function. This module does not know about files: saving and loading live in the checkpoint layer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import urllib.error
import urllib.parse
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import graph_passes
from graph_passes.testing import randomize_norms

from . import choices, sources, zoo
from ._io import format_bytes
from .cpu_memory import memory_limits
from .errors import BadInputError
from .layout import cast_example, layout_check, own_rounding
from .nn import COMPARISON_MODULES, GFGPPool2d, GFGPPool3d, MaxEntPool2d, MaxEntPool3d
from .spec import CUSTOM_POOL, ConversionSpec, FactorySource, ModuleSource, Source, TimmSource, TorchvisionSource, attach_spec

__all__ = ["convert", "convert_with_report", "build_model", "register_pool", "POOLS", "ConversionReport",
           "list_model_names", "default_image_size", "EXACT_TOLERANCE", "check_fits_in_memory", "available_memory"]

PoolFactory = Callable[[graph_passes.Site], Optional[nn.Module]]

# The pooling layers stay one node when a converted model is traced again (re-conversion, export).
for _layer in (GFGPPool2d, MaxEntPool2d, GFGPPool3d, MaxEntPool3d, *COMPARISON_MODULES.values()):
    graph_passes.register_leaf_module(_layer)

# Mapping from pool name to a function (activation) -> factory(site) -> module or None (keep).
POOLS: Dict[str, Callable[..., PoolFactory]] = {}

def register_pool(name: str):
    """Register a pool kind for ``convert(pool=name)``; refuses duplicates."""

    def deco(fn):
        if name in POOLS:
            raise ValueError(f"pool {name!r} is already registered")
        POOLS[name] = fn
        return fn

    return deco


def _by_rank(site: graph_passes.Site, layer_2d, layer_3d):
    """The 2-D or 3-D layer class for a site (its geometry has one entry per spatial dim)."""
    return layer_2d if len(site.stride) == 2 else layer_3d


def _padding(site: graph_passes.Site):
    """The site's padding, or ``"same"`` for a pool whose padding is computed from each input's size."""
    return "same" if site.same_padding else site.padding


@register_pool("gfgp")
def _gfgp(activation: str = "sigmoid") -> PoolFactory:
    return lambda site: _by_rank(site, GFGPPool2d, GFGPPool3d)(site.channels, site.kernel, site.stride, _padding(site),
                                                              site.ceil_mode, activation)


@register_pool("maxent")
def _maxent(activation: str = "sigmoid") -> PoolFactory:
    return lambda site: _by_rank(site, MaxEntPool2d, MaxEntPool3d)(site.channels, site.kernel, site.stride,
                                                                  _padding(site), site.ceil_mode, activation)


@register_pool("max")
def _max(activation: str = "sigmoid") -> PoolFactory:
    def factory(site: graph_passes.Site) -> nn.Module:
        if site.same_padding:
            return graph_passes.SamePool("max", site.kernel, site.stride)
        return _by_rank(site, nn.MaxPool2d, nn.MaxPool3d)(site.kernel, site.stride, site.padding, ceil_mode=site.ceil_mode)
    return factory


@register_pool("avg")
def _avg(activation: str = "sigmoid") -> PoolFactory:
    # Padded positions are excluded, as in max-entropy pooling (lam = 0 is this pool).
    def factory(site: graph_passes.Site) -> nn.Module:
        if site.same_padding:
            return graph_passes.SamePool("avg", site.kernel, site.stride, count_include_pad=False)
        return _by_rank(site, nn.AvgPool2d, nn.AvgPool3d)(site.kernel, site.stride, site.padding,
                                                          site.ceil_mode, count_include_pad=False)
    return factory


@register_pool("skip")
def _skip(activation: str = "sigmoid") -> PoolFactory:
    return lambda site: None  # keep skip pools and the model's own max/avg pools: the decomposition only


# The layout check calls a conversion exact when its skip-pool version differs from the original
# by at most this fraction of the original output's largest magnitude (float32 rounding).
EXACT_TOLERANCE = 1e-4


def list_model_names(task: Optional[str] = None) -> List[str]:
    """torchvision's model names, of one task or all (torchvision's own registries)."""
    return zoo.list_model_names(task)


def default_image_size(name: Optional[str]) -> int:
    """H = W of the example input for a torchvision model name (224 for others)."""
    return zoo.default_image_size(name, zoo.task_of(name) if name else "classification")


@dataclass
class ConversionReport:
    """What a conversion did, for tables and ``--json``."""

    model: str
    task: str
    pool: str
    placement: str
    image_size: int
    sites: List[Dict[str, Any]]
    placed: List[Dict[str, Any]]
    params_before: int
    params_after: int
    seconds: float
    weights: Optional[str] = None
    reused_tensors: int = 0
    new_tensors: List[str] = field(default_factory=list)
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    exact_max_error: Optional[float] = None  # layout check: max |diff| / output scale, over outputs and examples
    exact: Optional[bool] = None  # exact_max_error <= EXACT_TOLERANCE
    exact_examples: List[str] = field(default_factory=list)  # the example inputs the check ran on
    exact_dtype: Optional[str] = None
    parts: List[str] = field(default_factory=lambda: [""])  # converted submodules ("": the whole model)
    untraced: List[Dict[str, Any]] = field(default_factory=list)  # modules left as Python, and why
    frames: Optional[int] = None  # a video model's example clip length T

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# A --weights value is a file when it names one: it exists, has a folder part, or ends like a
# weights file; anything else is a torchvision weights name (DEFAULT, IMAGENET1K_V2,
# ResNet50_Weights.IMAGENET1K_V2).
_WEIGHTS_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".safetensors")


def _is_weights_file(weights: str) -> bool:
    seps = {os.sep, os.altsep or os.sep, "/"}
    return (any(sep in weights for sep in seps) or weights.lower().endswith(_WEIGHTS_SUFFIXES)
            or Path(weights).expanduser().exists())


def _load_weights(model: nn.Module, name: Optional[str], weights: str) -> List[str]:
    """Load torchvision weights (a name such as DEFAULT or IMAGENET1K_V2) or a local state_dict file.

    A file loads with ``torch.load(weights_only=True)`` (a pickle that would run code is refused).
    Returns the state keys left as initialised because their shape differs (e.g. the classifier
    of a model built with another ``num_classes``).
    """
    if _is_weights_file(weights):
        state = _read_weights_file(Path(weights).expanduser())
    else:
        if name is None:
            raise BadInputError(f"weights {weights!r} is not a file; for your own module pass a local state_dict file")
        import torchvision

        enum = torchvision.models.get_model_weights(name)
        members = [m.name for m in enum] + ["DEFAULT"]
        key = weights.split(".")[-1]
        if key not in members:
            raise choices.unknown(f"weights for {name}", key, members)
        state = _download_weights(enum[key])
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise BadInputError(
            f"weights {weights!r} do not fit {name or type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    # Tensors whose shape differs (a classifier rebuilt with --num-classes) stay freshly initialised.
    fitting = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    model.load_state_dict(fitting, strict=False)
    return sorted(set(own) - set(fitting))


def _read_weights_file(path: Path) -> Dict[str, Any]:
    """A local state_dict (or a checkpoint holding one under "state_dict"), read safely."""
    if not path.exists():
        raise BadInputError(f"weights file {path} does not exist; give an existing state_dict file, or a torchvision "
                            "weights name (DEFAULT, IMAGENET1K_V1, ...)")
    if path.is_dir():
        raise BadInputError(f"weights file {path} is a folder; give a state_dict file (.pt or .pth)")
    if path.name.lower().endswith(".safetensors"):
        raise BadInputError(f"weights file {path} is a safetensors file, which gfgp does not read; "
                            "save the state_dict with torch.save(model.state_dict(), 'weights.pt') and pass that")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        detail = (str(e).splitlines() or [""])[0][:160]
        raise BadInputError(f"cannot read weights file {path}: {type(e).__name__}: {detail}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise BadInputError(f"weights file {path} does not hold a state_dict")
    # Strip the wrappers' prefixes only (DDP, torch.compile), as timm's clean_state_dict does.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}


def _download_weights(weights: Any) -> Dict[str, Any]:
    """The state_dict of a torchvision ``Weights`` member, from torch hub's cache (downloaded
    into it when missing, when the user has internet); read with ``weights_only=True``.

    The download is done here, not by torchvision, so that a machine without network gets one
    line saying how to get the file there instead of urllib's traceback.
    """
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / os.path.basename(urllib.parse.urlparse(weights.url).path)
    if not cached.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(cached), None, progress=True)
        except OSError as e:  # urllib's URLError and HTTPError, sockets, a full or read-only disk
            if isinstance(e, urllib.error.HTTPError):
                why = f"the server answered {e.code} {e.reason}"
            elif isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
                why = f"no network: {getattr(e, 'reason', None) or e}"
            else:
                why = f"{e.strerror or e}"
            raise BadInputError(
                f"cannot download the weights {weights!r} from {weights.url} ({why}); download them "
                f"elsewhere and pass the file with --weights FILE, or put them in the torch hub cache {cache}"
            ) from e
    try:
        return weights.get_state_dict(progress=False, weights_only=True)  # loads the cached file
    except Exception as e:  # noqa: BLE001 - a damaged file in the cache is bad input
        raise BadInputError(f"cannot read the cached weights {cached} ({type(e).__name__}); delete it to download "
                            "it again") from e


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Run the block with torch's CPU RNG seeded, leaving the caller's RNG state untouched."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, example: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*graph_passes.example_args(example))
    return counter.get_total_flops() // 2


def _resolve(model: Union[str, nn.Module, Source], model_kwargs: Dict[str, Any], weights_backbone: Optional[str],
             task: Optional[str], pretrained: bool = False) -> Tuple[nn.Module, Optional[str], Source, str]:
    """``(a fresh model to convert, its torchvision name or None, its source, its task)``.

    ``model`` is a torchvision name, ``timm:NAME`` or ``package.module:function``
    (:mod:`gfgp_cli.sources`), a timm or factory source (a replay), or the user's module.
    ``pretrained``: build a timm model with its own pretrained weights.
    """
    if task is not None and task not in choices.TASKS:
        raise choices.unknown("task", task, choices.TASKS)
    if isinstance(model, str) and sources.is_external(model):
        model = sources.parse(model, model_kwargs)
    elif isinstance(model, (TimmSource, FactorySource)):
        model = dataclasses.replace(model, kwargs={**model.kwargs, **model_kwargs})
    if isinstance(model, (TimmSource, FactorySource)):
        if weights_backbone:
            raise BadInputError(f"--weights-backbone applies to torchvision detection and segmentation models, "
                                f"not to {model.describe()}")
        return sources.build(model, pretrained), None, model, task or "classification"
    if isinstance(model, str):
        name_task = zoo.task_of(model)
        if task is not None and task != name_task:
            raise BadInputError(f"{model} is a {name_task} model, not {task}")
        try:
            built = zoo.build(model, model_kwargs, weights_backbone)
        except (RuntimeError, ArithmeticError, AssertionError, IndexError, AttributeError, MemoryError) as e:
            # torchvision's builders refuse bad constructor arguments with these too (a negative
            # num_classes is "Trying to create tensor with negative dimension").
            raise BadInputError(f"cannot build {model} with {_shown_kwargs(model_kwargs)}: {type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}") from e
        return built, model, TorchvisionSource(model, dict(model_kwargs), weights_backbone), name_task
    if isinstance(model, nn.Module):
        if model_kwargs or weights_backbone:
            raise BadInputError(f"constructor arguments {sorted(model_kwargs)} only apply to models built by name")
        return copy.deepcopy(model), None, ModuleSource.of(model), task or "classification"
    raise BadInputError(f"model must be a torchvision model name, timm:NAME, package.module:function or an nn.Module, "
                        f"got {type(model).__name__}")


def build_model(model: Union[str, Source], **model_kwargs: Any) -> Tuple[nn.Module, str]:
    """``(the model a torchvision name, timm:NAME or package.module:function builds, its task)``,
    unconverted and with its builder's initial weights (what benchmarks compare against)."""
    built, _, _, task = _resolve(model, dict(model_kwargs), None, None)
    return built, task


def convert_with_report(
    model: Union[str, nn.Module, Source],
    pool: Union[str, PoolFactory] = "gfgp",
    placement: str = choices.DEFAULT_PLACEMENT,
    *,
    weights: Optional[str] = None,
    weights_backbone: Optional[str] = None,
    task: Optional[str] = None,
    activation: str = choices.DEFAULT_ACTIVATION,
    include_patch_embed: bool = False,
    image_size: Optional[int] = None,
    in_channels: int = 3,
    frames: Optional[int] = None,
    comparison: Optional[str] = None,
    seed: Optional[int] = None,
    measure: bool = False,
    **model_kwargs: Any,
) -> Tuple[torch.fx.GraphModule, "ConversionReport"]:
    """:func:`convert`, also returning a :class:`ConversionReport`.

    ``measure=True`` adds MACs before/after (torch.utils.flop_counter) and the exactness check
    (:mod:`gfgp_cli.layout`): the same decomposition and placement with plain skip pools is
    compared with the original model in eval mode on two example sizes (on a copy whose
    BatchNorm statistics are randomised when the model has random weights)
    (``exact_max_error``, in units of each output's scale; 0 up to float rounding for
    ``exact``/``local``). Detection models are checked in float64 with their score thresholds
    at 0, so that there are boxes to compare and float32 rounding cannot reorder them.
    """
    if placement not in choices.PLACEMENTS:
        raise choices.unknown("placement", placement, choices.PLACEMENTS)
    if activation not in choices.ACTIVATIONS:
        raise choices.unknown("activation", activation, choices.ACTIVATIONS)
    if not isinstance(in_channels, int) or in_channels < 1:
        raise BadInputError(f"in_channels must be a positive int, got {in_channels!r}")
    if comparison is not None and comparison not in COMPARISON_MODULES:
        raise choices.unknown("comparison module", comparison, sorted(COMPARISON_MODULES))
    if isinstance(pool, str):
        if pool not in POOLS:
            raise choices.unknown("pool", pool, sorted(POOLS))
        factory, pool_name = POOLS[pool](activation), pool
    elif callable(pool):
        factory, pool_name = pool, getattr(pool, "__name__", type(pool).__name__)
    else:
        raise BadInputError(f"pool must be one of {sorted(POOLS)} or a callable, got {pool!r}")

    check_fits_in_memory(model, model_kwargs, task=task, in_channels=in_channels, image_size=image_size, frames=frames)
    with _seeded(seed):  # new layers (and a model built from a name) get reproducible weights
        pretrained = weights == sources.PRETRAINED and not _is_weights_file(weights)
        original, name, source, task = _resolve(model, dict(model_kwargs), weights_backbone, task, pretrained)
        not_loaded = _load_weights(original, name, weights) if weights is not None and not pretrained else []
        original.eval()
        size = image_size or (zoo.default_image_size(name, task) if name or isinstance(model, nn.Module)
                              else sources.default_image_size(original) or zoo.default_image_size(None, task))
        frames = zoo.check_frames(source.describe(), task, frames)
        example = zoo.example_input(task, in_channels, size, frames=frames)

        start = time.perf_counter()
        gm, record = graph_passes.pipeline(
            original, example, placement=placement, factory=None if comparison else factory,
            include_patch_embed=include_patch_embed, partial=True,
        )
        if not record.parts:
            raise BadInputError(_nothing_converted(source.describe(), record.untraced))
        if comparison:  # docs/method.md section 4: a block in front of each max/avg pool, then the pools
            block = COMPARISON_MODULES[comparison]
            gm, _ = graph_passes.insert_before_pools(gm, lambda site: block(site.channels), comparison, example_input=example)
            gm, _ = graph_passes.replace_pools(gm, factory, example_input=example)
        seconds = time.perf_counter() - start

    before = {k: v for k, v in original.state_dict().items() if k not in not_loaded}
    after = gm.state_dict()
    new_tensors = [k for k in after if k not in before]
    attach_spec(gm, ConversionSpec(
        source=source,
        torchvision_version=_torchvision_version(),
        pool=pool_name if isinstance(pool, str) else CUSTOM_POOL,
        pool_name=None if isinstance(pool, str) else pool_name,
        placement=placement,
        activation=activation,
        include_patch_embed=include_patch_embed,
        image_size=size,
        in_channels=in_channels,
        frames=frames,
        task=task,
        parts=tuple(record.parts),
        comparison=comparison,
        # Where the weights came from, and which parameters did not come from them (finetune
        # recipes train these at the full learning rate); None when trained from scratch.
        weights=weights,
        new_parameters=tuple(k for k, _ in gm.named_parameters() if k in new_tensors) if weights else None,
        sites=tuple(record.sites),
    ))
    report = ConversionReport(
        model=source.describe(),
        task=task,
        pool=pool_name,
        placement=placement,
        image_size=size,
        sites=[asdict(s) for s in record.sites],
        placed=[asdict(p) for p in record.placed],
        params_before=_count_params(original),
        params_after=_count_params(gm),
        seconds=seconds,
        weights=weights,
        reused_tensors=len(after) - len(new_tensors) if weights else 0,
        new_tensors=new_tensors if weights else [],
        parts=list(record.parts),
        untraced=[asdict(u) for u in record.untraced],
        frames=frames,
    )
    if measure:
        _measure(report, original, gm, task, in_channels, size, placement, include_patch_embed, frames)
    gm.train()
    return gm, report


def _measure(report: ConversionReport, original: nn.Module, gm: nn.Module, task: str, in_channels: int, size: int,
             placement: str, include_patch_embed: bool, frames: Optional[int] = None) -> None:
    """MACs before/after on one example image, and the layout check (see convert_with_report)."""
    gm.eval()
    one = zoo.example_input(task, in_channels, size, batch=1, frames=frames)
    report.macs_before = _macs(original, one)
    report.macs_after = _macs(gm, one)
    reference = zoo.layout_check_model(copy.deepcopy(original), task)
    if report.weights is None:
        # Freshly initialised BatchNorms are the identity in eval mode, so a pool moved past one
        # it must not pass would go unnoticed: the check's copy gets random statistics.
        randomize_norms(reference, seed=0)
    examples = [zoo.example_input(task, in_channels, size, frames=frames),
                zoo.example_input(task, in_channels, size, second=True, frames=frames)]

    def check_in(dtype: torch.dtype) -> Any:
        ref = reference.to(dtype)
        cast = [cast_example(e, dtype) for e in examples]
        skip_model, _ = graph_passes.pipeline(ref, cast[0], placement=placement, factory=POOLS["skip"](),
                                              include_patch_embed=include_patch_embed, partial=True)
        return layout_check(ref, skip_model, cast, report.parts)

    dtype = torch.float64 if task == "detection" else torch.float32
    check = check_in(dtype)
    if (check.max_error > EXACT_TOLERANCE and dtype == torch.float32
            and own_rounding(reference, examples[0]) > EXACT_TOLERANCE):
        # The original's own float32 output is further than the tolerance from its float64 one
        # (rounding grows through it: halonet with random BatchNorm statistics), so float32
        # cannot tell a layout error from rounding: the same check in float64 decides.
        dtype = torch.float64
        check = check_in(dtype)
    report.exact_max_error = check.max_error
    report.exact_examples = check.examples
    report.exact_dtype = str(dtype).removeprefix("torch.")
    report.exact = check.max_error <= EXACT_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Memory: a model (or an example input) that cannot fit is refused before anything is built
# ---------------------------------------------------------------------------------------------


def available_memory() -> Optional[int]:
    """Bytes of memory this process may still allocate (the least of
    :func:`gfgp_cli.cpu_memory.memory_limits`), or None where that is unknown."""
    limits = memory_limits()
    return min(b for b, _ in limits) if limits else None


class _FactoriesOnMeta(TorchFunctionMode):
    """Tensors made by the factories layers allocate with (``torch.empty``, ``zeros``, ...) go to
    the meta device; every other op runs as usual (RegNet's builder computes its widths with
    CPU tensors and ``tolist()``, which meta tensors cannot give)."""

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                            torch.empty_strided})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


class _LargestOutput(TorchDispatchMode):
    """Records the bytes of the largest tensor any op returns (a lower bound of a forward's peak)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tensors) if isinstance(t, torch.Tensor))


def _build_on_meta(name: str, kwargs: Dict[str, Any]) -> Optional[nn.Module]:
    """torchvision model ``name`` with its parameters and buffers on the meta device (no memory),
    or None when its builder cannot run so (then its size is not known before building it).
    Constructor arguments the builder refuses are bad input, as in :func:`gfgp_cli.zoo.build`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the builder warns again when the model is really built
        for mode in (lambda: torch.device("meta"), _FactoriesOnMeta):
            try:
                with mode():
                    return zoo.build(name, kwargs)  # no backbone weights: they do not change the size
            except BadInputError:
                raise
            except Exception:  # noqa: BLE001 - meta tensors have no data; try the next way, else build
                continue
    return None


def _largest_activation(model: nn.Module, example: Any) -> int:
    """Bytes of the largest tensor of an eval forward of the meta ``model`` on the meta ``example``;
    0 when the forward cannot run on meta tensors (data-dependent ops: detection's NMS)."""
    mode = _LargestOutput()
    try:
        with torch.no_grad(), mode:
            model.eval()(*graph_passes.example_args(example))
    except Exception:  # noqa: BLE001 - any failure here only means the estimate is unknown
        return 0
    return mode.largest


def _shown_kwargs(kwargs: Dict[str, Any]) -> str:
    text = str({k: v for k, v in kwargs.items() if not (k == "weights_backbone" and v is None)})
    return text if len(text) <= 120 else text[:117] + "..."


# Mapping from (model name, constructor arguments, example size) to the bytes of its parameters
# and buffers and of its largest activation: a model converted again is not counted again.
_FOOTPRINTS: Dict[str, Tuple[int, int]] = {}


def _describe(model: Union[str, nn.Module, Source]) -> str:
    """The model as messages name it: its name, its source's description, or its class."""
    if isinstance(model, str):
        return model
    return type(model).__name__ if isinstance(model, nn.Module) else model.describe()


def check_fits_in_memory(model: Union[str, nn.Module, Source], model_kwargs: Dict[str, Any], *, task: Optional[str] = None,
                         in_channels: int = 3, image_size: Optional[int] = None, frames: Optional[int] = None) -> None:
    """Refuse (BadInputError, one line: bytes needed against bytes available) a conversion that
    cannot fit in memory, before anything is allocated.

    What it needs at least: the parameters and buffers of the torchvision model (counted on a
    copy built on the meta device, which allocates nothing), the example input, and the largest
    tensor of one forward of it (run on meta tensors; unknown, so not counted, for models whose
    forward needs data: detection). A model whose builder cannot run on meta tensors is not
    counted either. A user's module exists already, and a timm or factory model is built by
    code gfgp does not know: only their example input is counted.
    """
    available = available_memory()
    if available is None:
        return
    name = model if isinstance(model, str) and not sources.is_external(model) else None
    task = zoo.task_of(name) if name is not None else task or "classification"  # a module's: the caller's
    size = image_size or zoo.default_image_size(name, task)
    frames = zoo.check_frames(_describe(model), task, frames)
    with torch.device("meta"):
        example = zoo.example_input(task, in_channels, size, frames=frames)
    inputs = _nbytes(example)
    params = largest = 0
    if name is not None:
        key = repr((name, sorted(model_kwargs.items()), in_channels, size, frames))
        if key in _FOOTPRINTS:
            params, largest = _FOOTPRINTS[key]
        else:
            meta_model = _build_on_meta(name, dict(model_kwargs))
            if meta_model is not None:
                params = _nbytes([*meta_model.parameters(), *meta_model.buffers()])
                if params + inputs <= available:
                    largest = _largest_activation(meta_model, example)
            plain = all(type(v) in (type(None), bool, int, float, str) for v in model_kwargs.values())
            if plain and params + inputs <= available and len(_FOOTPRINTS) < 256:
                _FOOTPRINTS[key] = (params, largest)
    needed = params + inputs + largest
    if needed > available:
        what = f"{name} with {_shown_kwargs(model_kwargs)}" if name else _describe(model)
        parts = [f"{format_bytes(params)} of parameters and buffers"] if name else []
        parts.append(f"{format_bytes(inputs)} for the example input ({graph_passes.describe_example(example)})")
        if largest:
            parts.append(f"{format_bytes(largest)} for the largest activation")
        raise BadInputError(
            f"{what} at image size {size} needs at least {format_bytes(needed)} of memory ({', '.join(parts)}), "
            f"more than the {format_bytes(available)} available; use smaller constructor arguments or image size"
        )


def _nothing_converted(model: str, untraced: List[graph_passes.Untraced]) -> str:
    where = "; ".join(f"{u.qualname or '<root>'} ({u.type}): {u.reason}" for u in untraced[-2:])
    return (f"nothing to convert in {model}: torch.fx cannot trace it whole and no part of it that traces has a "
            f"downsampling site ({where}); make that forward traceable (no Python control flow on tensor values)")


def convert(model: Union[str, nn.Module, Source], pool: Union[str, PoolFactory] = choices.DEFAULT_POOL,
            placement: str = choices.DEFAULT_PLACEMENT, **options: Any) -> nn.Module:
    """Convert ``model`` so that its downsampling is done by ``pool`` pooling.

    Args:
        model: a torchvision model name of any task, ``timm:NAME`` (a timm model, optionally
            with its pretrained tag: ``timm:resnet50.a1_in1k``), ``package.module:function`` (a
            factory called with the constructor kwargs), or any ``nn.Module`` (never modified);
            constructor kwargs such as ``num_classes`` go in ``options``.
        pool: ``"gfgp"`` (default), ``"maxent"`` (learned per-channel lam), ``"max"``,
            ``"avg"``, ``"skip"`` (decomposition only), or a callable ``site -> nn.Module | None``.
        placement: ``"paper"`` (default; the official layouts of docs/method.md section 3),
            ``"exact"`` (pools move only where the output is unchanged) or ``"local"``.
        options: ``weights`` (torchvision weights name, ``"pretrained"`` for a timm model's own
            weights, or a state_dict file), ``activation``
            (``"sigmoid"`` or ``"softplus"``), ``include_patch_embed``, ``image_size`` and
            ``in_channels`` (of the example ``Tensor[2, in_channels, image_size, image_size]``
            used for shapes; default 224 and 3), ``frames`` (a video model's example clip is
            ``Tensor[2, in_channels, frames, image_size, image_size]``; default 16), ``comparison`` (``"nin"``, ``"resnin"`` or
            ``"se"``: insert that block before each max/avg pool, docs/method.md section 4; use with ``pool="skip"`` to
            keep the pools), ``seed`` (seed the initial weights of the model and of the new
            layers; default: torch's global RNG), and torchvision constructor kwargs.

    Returns:
        torch.fx.GraphModule in training mode whose unchanged layers keep their qualified names
        (the original state_dict loads into it); :func:`gfgp_cli.spec.spec_of` gives the
        :class:`~gfgp_cli.spec.ConversionSpec` that records the conversion.

    Examples::

        >>> m = convert("resnet50")
        >>> sum(isinstance(x, GFGPPool2d) for x in m.modules())
        5
    """
    return convert_with_report(model, pool, placement, **options)[0]


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__
