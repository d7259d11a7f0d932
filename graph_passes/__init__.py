"""Generic torch.fx passes that move a CNN's downsampling into replaceable pooling layers.

Each pass takes a GraphModule and returns it (with a typed record where it makes one); read top
to bottom::

    gm = trace(model)                           # qualnames preserved, eval-mode control flow
    sites = find_sites(gm, example_input)       # strided convs and max/avg pools (Site)
    gm = decompose(gm, sites)                   # conv(stride=s) -> conv(stride=1); SkipPool2d(s) (3-D: SkipPool3d)
    gm, placed = move_pools(gm, placement="exact")  # pools past BN/activations/1x1 convs/joins
    gm, replaced = replace_pools(gm, factory, find_sites(gm, example_input))  # pool -> factory(site)

or ``gm, report = pipeline(model, example_input, "paper", factory)``. A model torch.fx cannot
trace whole (detection, optical flow) converts part by part: ``pipeline(..., partial=True)``
runs the passes on each largest traceable submodule (:func:`convert_parts`) in a copy, keeping an
untraceable block whole (one leaf node) where the model around it traces. A strided conv inside a
Conv2d subclass's forward is decomposed too: traced through, its ``F.conv2d`` call runs at stride 1;
kept whole, the module runs its own forward with that call at stride 1 (:func:`at_stride1`). The package knows nothing
of any particular pooling layer: callers pass a factory and register their layer types as trace
leaves with :func:`register_leaf_module`.
"""

from ._util import ExampleInput, describe_example, example_args
from .decompose import decompose, stride1_conv
from .insert import Inserted, insert_before_pools
from .move import PLACEMENTS, Moved, PlacedPool, move_pools
from .partial import Converted, Part, Plan, Untraced, capture_inputs, convert_parts, find_parts
from .pipeline import Report, pipeline
from .replace import PoolFactory, Replaced, replace_pools
from .same_pool import SamePool, as_same_pool, same_geometry, same_padding
from .sites import Site, find_sites, is_strided_conv, is_strided_functional_conv, pool_kind
from .skip_pool import SkipPool, SkipPool2d, SkipPool3d, skip_pool
from .stride1 import AtStride1, at_stride1, conv_at_own_stride
from .trace import LeafTracer, TraceError, register_leaf_module, trace, untraced_state_keys

__all__ = [
    "ExampleInput",
    "describe_example",
    "example_args",
    "trace",
    "untraced_state_keys",
    "TraceError",
    "LeafTracer",
    "register_leaf_module",
    "Site",
    "find_sites",
    "is_strided_conv",
    "is_strided_functional_conv",
    "pool_kind",
    "SkipPool",
    "SkipPool2d",
    "SkipPool3d",
    "skip_pool",
    "SamePool",
    "same_padding",
    "same_geometry",
    "as_same_pool",
    "decompose",
    "stride1_conv",
    "at_stride1",
    "conv_at_own_stride",
    "AtStride1",
    "move_pools",
    "Moved",
    "PlacedPool",
    "PLACEMENTS",
    "replace_pools",
    "Replaced",
    "PoolFactory",
    "insert_before_pools",
    "Inserted",
    "pipeline",
    "Report",
    "find_parts",
    "capture_inputs",
    "convert_parts",
    "Converted",
    "Part",
    "Plan",
    "Untraced",
]
