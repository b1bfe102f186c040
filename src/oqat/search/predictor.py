"""Accuracy predictor: an MLP from an architecture encoding to its measured accuracy.

Encoding (:func:`encode`): for every block slot a one-hot of its kernel size followed by a
one-hot of its expand ratio -- all zeros when the slot is beyond its stage's depth, so the
depth is implied -- and a one-hot of the input resolution. For mbv3-imagenet that is
20 x (3 + 3) + 25 = 145 features.

Model: ``layers`` hidden layers of ``hidden`` units with ReLU (default 3 x 400) and a linear
output; targets are standardised with the training set's mean and standard deviation, which are
saved with the weights. Training: Adam on mean squared error, seeded (initialisation and
mini-batch order), so the same data and seed give the same predictor.

The data are (arch, accuracy) pairs measured by ``oqat predictor fit`` itself (re-calibrate and
evaluate on the held-out split, with a JSONL cache); quality is reported as Kendall tau (the
ranking quality that search needs) and RMSE on held-out architectures.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..models.checkpoint import save_atomic
from ..space import Arch, SearchSpace
from ..utils.files import load_torch_file
from ..utils.stats import kendall_tau, rmse

FORMAT = "oqat-predictor"
VERSION = 1


# ----------------------------------------------------------------------------- encoding
def encoding_size(space: SearchSpace) -> int:
    return space.num_blocks * (len(space.kernel_choices) + len(space.expand_choices)) + len(space.resolutions)


def encode(space: SearchSpace, arch: Arch) -> list[float]:
    """The feature vector of `arch` (see the module docstring)."""
    space.validate(arch)
    nk, ne = len(space.kernel_choices), len(space.expand_choices)
    active = set(space.active_blocks(arch))
    out: list[float] = []
    for slot in range(space.num_blocks):
        k = [0.0] * nk
        e = [0.0] * ne
        if slot in active:
            k[space.kernel_choices.index(arch.ks[slot])] = 1.0
            e[space.expand_choices.index(arch.e[slot])] = 1.0
        out += k + e
    r = [0.0] * len(space.resolutions)
    r[space.resolutions.index(arch.r)] = 1.0
    return out + r


def encode_batch(space: SearchSpace, archs: Sequence[Arch]) -> torch.Tensor:
    return torch.tensor([encode(space, a) for a in archs], dtype=torch.float32).reshape(len(archs), encoding_size(space))


# ----------------------------------------------------------------------------- model
class AccuracyMLP(nn.Module):
    def __init__(self, in_features: int, hidden: int = 400, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1) * self.target_std + self.target_mean


class Predictor:
    """A trained accuracy predictor for one search space and bit-width."""

    def __init__(self, space: SearchSpace, bits: int, model: AccuracyMLP, hidden: int, layers: int,
                 metrics: dict | None = None, meta: dict | None = None):
        self.space, self.bits, self.model = space, bits, model
        self.hidden, self.layers = hidden, layers
        self.metrics = metrics or {}
        self.meta = meta or {}

    @torch.no_grad()
    def predict(self, archs: Sequence[Arch]) -> list[float]:
        if not archs:
            return []
        self.model.eval()
        return self.model(encode_batch(self.space, archs)).tolist()

    def evaluate(self, archs: Sequence[Arch], accuracies: Sequence[float]) -> dict:
        pred = self.predict(archs)
        return {"kendall_tau": kendall_tau(pred, accuracies), "rmse": rmse(pred, accuracies), "n": len(archs)}

    def save(self, path: str | Path) -> Path:
        return save_atomic({
            "format": FORMAT, "version": VERSION, "space": self.space.to_dict(), "bits": self.bits,
            "hidden": self.hidden, "layers": self.layers, "state": self.model.state_dict(),
            "metrics": self.metrics, "meta": self.meta,
        }, path)

    @classmethod
    def load(cls, path: str | Path) -> "Predictor":
        path = Path(path)
        data = load_torch_file(path, "predictor file")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not an oqat predictor (no '{FORMAT}' format tag)")
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: predictor format version {data.get('version')!r} is not supported")
        space = SearchSpace.from_dict(data["space"])
        model = AccuracyMLP(encoding_size(space), int(data["hidden"]), int(data["layers"]))
        model.load_state_dict(data["state"])
        return cls(space, int(data["bits"]), model, int(data["hidden"]), int(data["layers"]),
                   data.get("metrics") or {}, data.get("meta") or {})


class PredictorAccuracy:
    """Accuracy source "predictor" for the search (``list[Arch] -> list[float]``)."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.calls = 0

    def __call__(self, archs: list[Arch]) -> list[float]:
        for a in archs:
            if a.bits != self.predictor.bits:
                raise ValueError(f"bits: the predictor was fitted on {self.predictor.bits}-bit subnets, "
                                 f"not {a.bits}-bit ones")
        self.calls += len(archs)
        return self.predictor.predict(archs)


def fit_predictor(space: SearchSpace, archs: Sequence[Arch], accuracies: Sequence[float], *, bits: int | None = None,
                  hidden: int = 400, layers: int = 3, epochs: int = 300, batch_size: int = 128, lr: float = 1e-3,
                  weight_decay: float = 1e-4, seed: int = 0) -> Predictor:
    """Train the MLP on (arch, accuracy) pairs; seeded and deterministic."""
    if len(archs) != len(accuracies):
        raise ValueError(f"fit_predictor: {len(archs)} archs but {len(accuracies)} accuracies")
    if len(archs) < 2:
        raise ValueError(f"fit_predictor: need at least 2 measured archs, got {len(archs)}")
    bits = bits if bits is not None else archs[0].bits
    x = encode_batch(space, archs)
    y = torch.tensor(list(accuracies), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AccuracyMLP(x.size(1), hidden, layers)
    model.target_mean.fill_(float(y.mean()))
    model.target_std.fill_(float(y.std()) if float(y.std()) > 1e-8 else 1.0)
    opt = torch.optim.Adam(model.net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    g = torch.Generator().manual_seed(seed)
    target = (y - model.target_mean) / model.target_std
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = ((model.net(x[idx]).squeeze(-1) - target[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return Predictor(space, bits, model, hidden, layers)


def split_holdout(n: int, val_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: a seeded shuffle, the last `val_frac` held out (at least one each)."""
    if not 0 < val_frac < 1:
        raise ValueError(f"--val-frac: must lie in (0, 1), got {val_frac}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = min(n - 1, max(1, int(round(val_frac * n))))
    return sorted(idx[: n - n_val]), sorted(idx[n - n_val:])


def sample_distinct(space: SearchSpace, n: int, bits: int, seed: int, exclude: set[str] | None = None) -> list[Arch]:
    """`n` distinct (canonical) random subnets; ValueError if the space has fewer."""

    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Arch] = []
    tries = 0
    while len(out) < n:
        a = space.sample(rng, bits)
        k = space.key(a)
        tries += 1
        if k in seen:
            if tries > 100 * n + 1000:
                raise ValueError(f"--samples: could not draw {n} distinct subnets of {space.name}")
            continue
        seen.add(k)
        out.append(a)
    return out


__all__ = ["AccuracyMLP", "Predictor", "PredictorAccuracy", "encode", "encode_batch", "encoding_size",
           "fit_predictor", "sample_distinct", "split_holdout"]
