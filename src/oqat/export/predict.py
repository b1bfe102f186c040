"""Classify image files with an exported model (ONNX via onnxruntime, or a packed ``.oqat``).

The model's own metadata says how to prepare an image (:class:`~oqat.export.meta.Preprocessing`):
open it, convert to grayscale or RGB by ``in_channels``, centre-crop when the model was trained
on ImageFolder data (shorter side to ``resolution / crop_fraction``, then the centre square),
scale to [0, 1], normalise with ``mean``/``std`` and resize bilinearly to ``resolution``
(antialiased when shrinking, as ``oqat.data.resize_batch`` does for training batches).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import resize_batch
from . import openvino_check as ovc
from .meta import Preprocessing
from .onnx import read_onnx_info
from .packed import load_packed
from .verify import ort_session
from .verify_int import int_session

MAX_PIXELS = 64 * 10**6   # far above any classifier input; a larger file is a mistake or an attack


def detect_format(path: str | Path) -> str:
    """"onnx" or "oqat" (packed), from the suffix or, failing that, the file's first bytes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: model file not found")
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if path.suffix.lower() in (".oqat", ".safetensors"):
        return "oqat"
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":           # safetensors: u64 header length, then JSON
        return "oqat"
    return "onnx"


ENGINES = ("auto", "onnxruntime", "openvino")


def choose_engine(info: dict, engine: str = "auto") -> str:
    """The engine that runs an ONNX file: ``auto`` takes OpenVINO for a QCDQ file that OpenVINO
    verified at export (it runs it on integer kernels, onnxruntime in float) when it is installed,
    onnxruntime otherwise."""
    if engine not in ENGINES:
        raise ValueError(f"engine: {engine!r} is not one of {list(ENGINES)}")
    if engine != "auto":
        return engine
    record = info.get("openvino")
    verified = isinstance(record, dict) and record.get("verified") is True     # metadata is untrusted text
    return "openvino" if verified and "integer" not in info and ovc.available() else "onnxruntime"


class ExportedModel:
    """An exported model ready for inference: ``info`` (its metadata), ``engine`` (what runs it,
    with its version) and ``logits(batch)``."""

    def __init__(self, path: str | Path, threads: int | None = None, engine: str = "auto"):
        self.path = Path(path)
        self.format = detect_format(self.path)
        if self.format == "oqat":
            if engine != "auto":
                choose_engine({}, engine)                               # names a bad value first
                raise ValueError(f"{self.path}: a packed .oqat model runs on PyTorch; engine {engine!r} "
                                 f"needs an ONNX file")
            net = load_packed(self.path)
            self.info, self.engine = net.export_info, f"PyTorch {torch.__version__}"
            self._run = lambda x: net(torch.from_numpy(x)).numpy()
        else:
            self.info = read_onnx_info(self.path)
            chosen = choose_engine(self.info, engine)
            try:
                self.engine, self._run = self._onnx_runner(chosen, threads)
            except ValueError as exc:
                if engine != "auto" or chosen != "openvino":
                    raise
                # `auto` asked for the best engine at hand, not for OpenVINO: onnxruntime verified the file too
                warnings.warn(f"{exc}; running it on onnxruntime instead", stacklevel=2)
                self.engine, self._run = self._onnx_runner("onnxruntime", threads)
        self.preprocessing = Preprocessing.from_dict(self.info["preprocessing"])
        names = self.info.get("class_names")
        self.class_names = list(names) if names else None

    def _onnx_runner(self, engine: str, threads: int | None):
        if engine == "openvino":
            return f"OpenVINO {ovc.version()}", ovc.OpenVINOModel(self.path, threads=threads or 0)
        import onnxruntime

        if "integer" in self.info:        # integer kernels: no QDQ folding, see verify_int
            try:
                session = int_session(self.path, threads=threads)
            except ValueError as exc:
                raise ValueError(f"{self.path}: {exc}") from None
        else:
            try:
                session = ort_session(self.path, optimize=True, threads=threads)
            except Exception as exc:
                raise ValueError(f"{self.path}: onnxruntime cannot load the model: {exc}") from None
        name = session.get_inputs()[0].name
        return f"onnxruntime {onnxruntime.__version__}", lambda x: session.run(None, {name: x})[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def top1(self, batches) -> dict:
        """Top-1 (percent) and image count of this file on (images, labels) batches of
        preprocessed tensors at any size (resized to the model's resolution as evaluation does)."""
        correct = n = 0
        for x, y in batches:
            x = resize_batch(x.float().cpu(), self.preprocessing.resolution)
            correct += int((self.logits(x.numpy()).argmax(1) == y.cpu().numpy()).sum())
            n += int(y.shape[0])
        if n == 0:
            raise ValueError(f"{self.path}: no images to measure the file's accuracy on")
        return {"top1": 100.0 * correct / n, "n": n}


def load_image(path: str | Path, prep: Preprocessing) -> torch.Tensor:
    """One image file as the model's (C, r, r) float input; ValueError naming the file if it
    is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: image file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    mode = {1: "L", 3: "RGB"}.get(prep.in_channels)
    if mode is None:
        raise ValueError(f"preprocessing.in_channels: {prep.in_channels} is not 1 or 3; cannot read images for it")
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before any pixel
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ValueError(f"{path}: {w}x{h} pixels is more than an input image may have "
                                 f"({MAX_PIXELS // 10**6} megapixels); refused")
            img = img.convert(mode)
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: an image of far more pixels than its file size suggests (a decompression "
                         f"bomb?); refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    r = prep.resolution
    if prep.crop_fraction < 1.0:
        short = int(r / prep.crop_fraction)
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - r) // 2, (h - r) // 2
        img = img.crop((left, top, left + r, top + r))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(prep.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(prep.std, dtype=torch.float32)[:, None, None]
    x = ((x - mean) / std)[None]
    if tuple(x.shape[-2:]) != (r, r):
        shrink = x.shape[-2] > r or x.shape[-1] > r
        x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=shrink)
    return x[0].contiguous()


@dataclass
class Prediction:
    file: str
    index: int
    name: str | None
    probability: float
    top: list[tuple[int, str | None, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "class": self.index, "name": self.name, "probability": self.probability,
                "top": [{"class": i, "name": n, "probability": p} for i, n, p in self.top]}


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_files(model: ExportedModel | str | Path, images: list[str | Path], *, top_k: int = 1,
                  batch_size: int = 32) -> list[Prediction]:
    """Class index, name (if the model stores names) and probability for each image file."""
    if not isinstance(model, ExportedModel):
        model = ExportedModel(model)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top: expected a positive integer, got {top_k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size: expected a positive integer, got {batch_size!r}")
    if not images:
        raise ValueError("no image files given")
    tensors = [load_image(p, model.preprocessing) for p in images]   # all errors before any work
    out: list[Prediction] = []
    names = model.class_names
    for start in range(0, len(tensors), batch_size):
        batch = torch.stack(tensors[start:start + batch_size]).numpy()
        probs = _softmax(model.logits(batch))
        for j, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")[: min(top_k, p.size)]
            top = [(int(i), names[i] if names else None, float(p[i])) for i in order]
            out.append(Prediction(str(images[start + j]), top[0][0], top[0][1], top[0][2], top))
    return out


def format_prediction(p: Prediction) -> str:
    def one(i, n, prob):
        return f"{i}" + (f" ({n})" if n else "") + f" p={prob:.4f}"

    text = f"{p.file}: class {one(p.index, p.name, p.probability)}"
    if len(p.top) > 1:
        text += "  [top: " + ", ".join(one(*t) for t in p.top) + "]"
    return text


__all__ = ["ENGINES", "ExportedModel", "choose_engine", "Prediction", "detect_format", "load_image", "predict_files", "format_prediction"]
