"""LSQ fake quantization with one learned step per tensor, shared by every subnet (method.md s. 2).

``lsq_quantize`` is the autograd function, :class:`LSQQuantizer` the module that owns a step;
the element-wise kernels (eager, compiled, native C) compute the same numbers.
"""

from .activations import ACT_CODES, act_code, activation, activation_fn, apply_activation_
from .kernels import IMPLS
from .lsq import STEP_EPS, LSQQuantizer, grad_scale, kernel_impl, lsq_quantize, lsq_reference, qrange

__all__ = ["ACT_CODES", "IMPLS", "LSQQuantizer", "STEP_EPS", "act_code", "activation", "activation_fn",
           "apply_activation_", "grad_scale", "kernel_impl", "lsq_quantize", "lsq_reference", "qrange"]
