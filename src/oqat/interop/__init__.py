"""The published OFA and OQA MobileNetV3 supernets, read into oqat checkpoints and written back.

:mod:`.layout` is the key-by-key map, :mod:`.ofa` and :mod:`.oqa` convert state dicts (OQA's
LSQ steps with their meaning), :mod:`.files` reads foreign files without unpickling code, and
:mod:`.convert` does whole files for ``oqat convert``. docs/interop.md explains every decision.
"""

from .convert import Conversion, bits_from_name, convert_file, detect_layout, export_file
from .files import read_state_dict
from .layout import KeyPair, key_pairs
from .ofa import OFA_SPACES, Imported, from_ofa, to_ofa
from .oqa import from_oqa, to_oqa

__all__ = ["Conversion", "Imported", "KeyPair", "OFA_SPACES", "bits_from_name", "convert_file", "detect_layout",
           "export_file", "from_ofa", "from_oqa", "key_pairs", "read_state_dict", "to_ofa", "to_oqa"]
