"""oqat: Once Quantization-Aware Training of low-bit once-for-all supernets.

The layers, bottom to top (each may import only those below it; see docs/architecture.md):
``utils`` -> ``space`` -> ``quant`` -> ``nn`` -> ``models`` / ``data`` -> ``measure`` ->
``training`` / ``search`` / ``export`` -> ``pipeline`` -> ``cli``.
"""

from .models import SubNet, Supernet, build_supernet
from .space import Arch, SearchSpace, cost
from .training.inherit import inherit_bits
from .utils.version import __version__

__all__ = ["Arch", "SearchSpace", "Supernet", "SubNet", "build_supernet", "cost", "inherit_bits", "__version__"]
