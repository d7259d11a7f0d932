"""The max-entropy pooling ops, 2-D and 3-D (docs/method.md section 1)."""

from .maxent_pool import check_pool_geometry, maxent_pool2d, maxent_pool3d, pool_output_size

__all__ = ["maxent_pool2d", "maxent_pool3d", "pool_output_size", "check_pool_geometry"]
