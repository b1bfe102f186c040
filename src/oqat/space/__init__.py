"""Search spaces, architectures and their analytic costs: pure data, no torch.

:class:`SearchSpace` (stages, choices, resolutions; presets in ``presets/*.yaml``), :class:`Arch`
(one subnet), and :mod:`~oqat.space.cost` (MACs, params, BitOPs, OQA-FLOPs, size; OFA's
counting convention).
"""

from . import cost
from .search_space import (
                           ACTIVATIONS,
                           FULL_PRECISION,
                           QUANT_BITS,
                           VALID_BITS,
                           Arch,
                           SearchSpace,
                           StageSpec,
                           make_divisible,
                           normalize_bits,
                           parse_int_list,
)

__all__ = ["ACTIVATIONS", "Arch", "FULL_PRECISION", "QUANT_BITS", "SearchSpace", "StageSpec", "VALID_BITS", "cost",
           "make_divisible", "normalize_bits", "parse_int_list"]
