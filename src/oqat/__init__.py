"""oqat: Once Quantization-Aware Training of low-bit once-for-all supernets."""

from . import cost
from .models import SubNet, Supernet, build_supernet
from .space import Arch, SearchSpace

__version__ = "0.1.0"


def inherit_bits(*args, **kwargs):  # lazy import: keeps `import oqat` light
    from .inherit import inherit_bits as _inherit_bits

    return _inherit_bits(*args, **kwargs)


__all__ = ["Arch", "SearchSpace", "Supernet", "SubNet", "build_supernet", "cost", "inherit_bits", "__version__"]
