"""The gradient mask, under the name earlier releases gave it: see :mod:`hft_plugin.mechanisms.mask`
and, for boxes and masks, :mod:`hft_plugin.boxes`."""

from .boxes import frozen_slices as frozen_boxes, to_mask as region_mask
from .mechanisms.mask import ELEMENTWISE_OPTIMIZERS, FrozenRestore, GradientMask, local_tensor, needs_restore

__all__ = ["ELEMENTWISE_OPTIMIZERS", "FrozenRestore", "GradientMask", "frozen_boxes", "local_tensor", "needs_restore",
           "region_mask"]
