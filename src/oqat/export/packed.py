"""The packed ``.oqat`` format: integer weight codes at b bits in one safetensors file.

One file holds everything needed to rebuild the subnet:

* ``<layer>.weight.codes`` (uint8): the integer codes of each quantized conv weight, offset to
  ``code - Qn`` (0 .. 2^b - 1) and bit-packed: code ``i`` occupies bits ``i*b .. i*b + b - 1``
  of the stream, least significant bit first, stream bit ``k`` being bit ``k % 8`` of byte
  ``k // 8``; the last byte is zero-padded. So a 2-bit weight takes a quarter of a byte.
* every other tensor the eval forward needs (full-precision stem, squeeze-excite and classifier
  weights and biases, BN affine parameters and running statistics, step sizes) as float32;
* the model description of :func:`oqat.export.meta.model_info` (arch, space, bits, steps,
  preprocessing, classes) plus the layout of the packed tensors, as JSON under the key
  ``"oqat"`` of the safetensors header metadata.

:func:`load_packed` builds a supernet of the space at the stored bit-width, extracts the arch
and loads ``weight = codes * step`` (the float32 product the PyTorch forward itself forms), so
the rebuilt subnet reproduces the original's integer codes and outputs exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..models import build_supernet
from ..nn.layers import QConvBN, QLinear
from ..quant import STEP_EPS, LSQQuantizer, qrange
from ..space import Arch, SearchSpace
from .meta import FORMAT, check_initialized
from .onnx import weight_codes

METADATA_KEY = "oqat"
CODES_SUFFIX = ".codes"


# ------------------------------------------------------------------------------------ bits
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2^bits into a little-endian bit stream of ceil(n*bits/8) bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} is outside 1..8")
    v = np.asarray(values).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"pack_bits: values must lie in [0, {(1 << bits) - 1}], got [{v.min()}, {v.max()}]")
    v = v.astype(np.uint8)
    if bits == 8:
        return v.copy()
    planes = np.unpackbits(v[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` values (uint8)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} is outside 1..8")
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    need = (count * bits + 7) // 8
    if packed.size < need:
        raise ValueError(f"unpack_bits: {count} values of {bits} bits need {need} bytes, got {packed.size}")
    if bits == 8:
        return packed[:count].copy()
    planes = np.unpackbits(packed[:need], bitorder="little")[: count * bits].reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(count)


# ------------------------------------------------------------------------------------ save
def _quantized_convs(sub) -> dict[str, QConvBN | QLinear]:
    """The layers whose weights are stored as codes: quantized convs, and a quantized classifier."""
    return {name: m for name, m in sub.named_modules()
            if isinstance(m, (QConvBN, QLinear)) and m.quantizes_weight}


def plain_permissions(path) -> None:
    """Give `path` the permissions of a plain new file (temporary files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        plain_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_packed(sub, path: str | Path, info: dict) -> Path:
    """Write ``sub`` (an extracted SubNet) to ``path`` in the packed format; returns the path."""
    from safetensors.numpy import save_file

    check_initialized(sub)
    modules = dict(sub.named_modules())
    convs = _quantized_convs(sub)
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    with torch.no_grad():
        for key, t in sub.state_dict().items():
            owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
            if leaf in ("initialized", "num_batches_tracked"):
                continue                       # rebuilt on load
            if leaf == "step":
                q = modules[owner]
                if isinstance(q, LSQQuantizer) and not q.enabled:
                    continue                   # identity quantizer of a full-precision model
            if leaf == "weight" and owner in convs:
                q = convs[owner].weight_quant
                qn, _ = qrange(q.bits, q.signed)
                codes = weight_codes(t, q).to(torch.int64).numpy() - qn
                tensors[key + CODES_SUFFIX] = pack_bits(codes, q.bits)
                layout[key] = {"bits": q.bits, "offset": qn, "shape": list(t.shape),
                               "quantizer": f"{owner}.weight_quant"}
                continue
            tensors[key] = t.detach().cpu().float().contiguous().numpy()
    meta = dict(info)
    meta["packed"] = layout
    path = Path(path)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)}))
    return path


# ------------------------------------------------------------------------------------ load
def _open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path}: packed model file not found")
    try:
        return safe_open(str(path), framework="np")
    except Exception as exc:
        raise ValueError(f"{path}: not a packed oqat model (unreadable safetensors file: {exc})") from None


def read_packed_info(path: str | Path) -> dict:
    """The model description stored in a packed file (ValueError naming the file otherwise)."""
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: safetensors file without oqat metadata (not written by `oqat export --format oqat`)")
    try:
        info = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError:
        raise ValueError(f"{path}: oqat metadata is not valid JSON") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: oqat metadata lacks the {FORMAT!r} format tag")
    for key in ("arch", "space", "bits", "packed"):
        if key not in info:
            raise ValueError(f"{path}: oqat metadata lacks {key!r}")
    return info


def load_packed(path: str | Path, impl: str = "eager"):
    """Rebuild the SubNet stored in a packed file (eval mode); its ``export_info`` attribute
    holds the stored model description."""
    path = Path(path)
    info = read_packed_info(path)
    with _open(path) as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    try:
        space = SearchSpace.from_dict(info["space"])
        arch = Arch.from_dict(info["arch"])
        net = build_supernet(space, info["bits"], unsigned_activations=bool(info.get("unsigned_activations", False)),
                             dropout=float(info.get("dropout", 0.0)), impl=impl)
        sub = net.extract(arch)
    except ValueError as exc:
        raise ValueError(f"{path}: stored arch/space do not build a model: {exc}") from None
    del net
    modules = dict(sub.named_modules())
    state = sub.state_dict()
    layout = info["packed"]
    new: dict[str, torch.Tensor] = {}
    for key, ref in state.items():
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        module = modules.get(owner)
        if key in layout:
            spec = layout[key]
            q = modules[spec["quantizer"]]
            step_key = spec["quantizer"] + ".step"
            if step_key not in stored or key + CODES_SUFFIX not in stored:
                raise ValueError(f"{path}: tensor {key + CODES_SUFFIX} or {step_key} is missing")
            if list(spec["shape"]) != list(ref.shape) or int(spec["bits"]) != q.bits:
                raise ValueError(f"{path}: {key}: stored shape {spec['shape']} at {spec['bits']} bit does not fit "
                                 f"the rebuilt layer ({list(ref.shape)} at {q.bits} bit)")
            codes = unpack_bits(stored[key + CODES_SUFFIX], q.bits, ref.numel()).astype(np.int64) + int(spec["offset"])
            step = torch.from_numpy(np.asarray(stored[step_key], dtype=np.float32)).reshape(())
            s = step.abs().clamp_min(STEP_EPS)
            new[key] = torch.from_numpy(codes.astype(np.float32)).reshape(ref.shape) * s
        elif key in stored:
            value = torch.from_numpy(np.asarray(stored[key]))
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(f"{path}: tensor {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
            new[key] = value.to(ref.dtype)
        elif leaf == "initialized":
            new[key] = torch.tensor(isinstance(module, LSQQuantizer) and module.enabled)
        elif leaf == "num_batches_tracked" or (leaf == "step" and isinstance(module, LSQQuantizer)
                                                and not module.enabled):
            new[key] = ref
        else:
            raise ValueError(f"{path}: tensor {key} is missing")
    sub.load_state_dict(new)
    sub.eval()
    sub.export_info = info
    return sub


__all__ = ["pack_bits", "unpack_bits", "save_packed", "load_packed", "read_packed_info"]
