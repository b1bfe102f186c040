"""Weight codes written as two int8 parts whose layers add up to the layer on the trained codes,
for layers that OpenVINO (and onnxruntime's ``QGemm``) compute wrongly on x86 CPUs without VNNI
(docs/export.md).

There oneDNN multiplies uint8 inputs (signed inputs shifted by 128) by int8 weights in pairs
summed in int16 (``vpmaddubsw``), which saturates unless ``2 * 255 * |w| <= 32767``, i.e.
``|w| <= 64``; and for a signed input and a kernel over 1x1 it first halves the weight codes,
``round(c / 2) * 2``, exact only for even codes (``benchmarks/probe_int8_layers.py``). Each
split below makes both parts exact there; on every other engine the two layers and their ``Add``
compute the same sum. Only the ``edge_bits`` layers can need one (the stem: a signed image input
and a 3x3 kernel; the classifier: 8-bit weights, split only where a trained code lies beyond
+-64, as a split classifier doubles its share of the file), so the cost is one more small layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PAIR_LIMIT = 64        # the largest |code| whose products with uint8 pairs fit int16


@dataclass(frozen=True)
class CodeSplit:
    """How to write codes ``c`` as ``first + second * second_scale`` (both int8)."""

    name: str                          # recorded in the integer form's metadata
    suffixes: tuple[str, str]          # initializer names: "<quantizer>" + suffix
    second_scale: float                # the second part's scale over the weight's step
    split: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

    def join(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """The codes that :attr:`split` split."""
        return (first.astype(np.float64) + second.astype(np.float64) * self.second_scale).astype(np.int16)


def _even_odd(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    even = 2 * np.floor_divide(codes, 2)
    return even, 2 * (codes - even)


def _inner_outer(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    inner = np.clip(codes, -PAIR_LIMIT, PAIR_LIMIT)
    return inner, codes - inner


#: ``2 floor(c/2)`` and ``2 (c mod 2)`` in {0, 2} at half the step: both even, so halving is
#: exact, and halved both lie within +-64. For signed inputs with kernels over 1x1.
EVEN_ODD = CodeSplit("even_odd", (".codes_even", ".codes_odd"), 0.5, _even_odd)
#: ``clip(c, -64, 64)`` and the rest in [-64, 63]: for 8-bit weights on an unhalved layer.
INNER_OUTER = CodeSplit("inner_outer", (".codes_inner", ".codes_outer"), 1.0, _inner_outer)
SPLITS = (EVEN_ODD, INNER_OUTER)
SPLITS_BY_NAME = {s.name: s for s in SPLITS}


def split_for(*, signed_input: bool, kernel: int, max_code: int, linear: bool = False) -> CodeSplit | None:
    """The split a layer needs, or None (one layer on the codes); ``max_code`` is the largest
    |code| of its trained weight. The 8-bit convs of an 8-bit network stay one conv: a split
    would double their cost on every engine, and the export's OpenVINO check catches a
    saturated one (docs/export.md)."""
    if signed_input and kernel > 1:
        return EVEN_ODD
    if linear and max_code > PAIR_LIMIT:
        return INNER_OUTER
    return None


def joined_codes(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{quantizer: codes} of every split weight among a graph's initializers {name: array}; a
    part without its partner is left out (verification then reports the quantizer missing)."""
    out = {}
    for s in SPLITS:
        first, second = s.suffixes
        for name, a in arrays.items():
            q = name[: -len(first)]
            if name.endswith(first) and q + second in arrays:
                out[q] = s.join(a, arrays[q + second])
    return out


__all__ = ["EVEN_ODD", "INNER_OUTER", "PAIR_LIMIT", "SPLITS", "SPLITS_BY_NAME", "CodeSplit", "joined_codes", "split_for"]
