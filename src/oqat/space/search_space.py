"""Search spaces and architectures as plain data (no torch).

A :class:`SearchSpace` describes a once-for-all MobileNetV3-style supernet: a fixed stem and
first block, elastic stages (depth per stage, kernel size and expand ratio per block slot) and
a range of input resolutions. An :class:`Arch` picks one subnet (and its bit-width). Both
round-trip through JSON-compatible dicts, and every validation error names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from ..utils.config import load_json, load_yaml

ACTIVATIONS = ("relu", "h_swish")
FULL_PRECISION = 32
QUANT_BITS = tuple(range(2, 9))
VALID_BITS = QUANT_BITS + (FULL_PRECISION,)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never losing more than 10% (OFA rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def normalize_bits(bits: int | None) -> int:
    """Map ``None`` (no quantization) to 32 and check the value is a supported bit-width."""
    if bits is None:
        return FULL_PRECISION
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits: {bits!r} is not supported; use one of {list(QUANT_BITS)} or 32/None")
    return bits


def _reject_unknown(data: dict, allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _int_list(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name}: expected a list of integers, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{name}[{i}]: expected an integer, got {item!r}")
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class Arch:
    """One subnet: kernel size and expand ratio per block slot, depth per stage, resolution, bits.

    ``ks`` and ``e`` have one entry per block slot of the space; entries of slots beyond a stage's
    depth are ignored by the network (see :meth:`SearchSpace.canonical`). ``bits`` is 2..8, or 32
    for full precision (``None`` is accepted and stored as 32).
    """

    ks: tuple[int, ...]
    e: tuple[int, ...]
    d: tuple[int, ...]
    r: int
    bits: int = FULL_PRECISION

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", _int_list(self.ks, "ks"))
        object.__setattr__(self, "e", _int_list(self.e, "e"))
        object.__setattr__(self, "d", _int_list(self.d, "d"))
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise ValueError(f"r: expected an integer resolution, got {self.r!r}")
        object.__setattr__(self, "bits", normalize_bits(self.bits))

    @property
    def quantized(self) -> bool:
        return self.bits != FULL_PRECISION

    def to_dict(self) -> dict:
        return {"ks": list(self.ks), "e": list(self.e), "d": list(self.d), "r": self.r, "bits": self.bits}

    @classmethod
    def from_dict(cls, data: dict) -> "Arch":
        if not isinstance(data, dict):
            raise ValueError(f"arch: expected a mapping, got {type(data).__name__}")
        _reject_unknown(data, ("ks", "e", "d", "r", "bits"), "arch")
        missing = [k for k in ("ks", "e", "d", "r") if k not in data]
        if missing:
            raise ValueError(f"arch: missing key(s) {missing}")
        return cls(ks=data["ks"], e=data["e"], d=data["d"], r=data["r"], bits=data.get("bits", FULL_PRECISION))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Arch":
        """Read an arch JSON file; a file holding {"arch": {...}, ...} (search output) also works."""
        path = Path(path)
        data = load_json(path, "arch file")
        if isinstance(data, dict) and "arch" in data and isinstance(data["arch"], dict):
            data = data["arch"]
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "Arch":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StageSpec:
    """An elastic stage: output width, stride of its first block, activation, squeeze-excite."""

    width: int
    stride: int
    act: str
    se: bool

    FIELDS = ("width", "stride", "act", "se")


@dataclass(frozen=True)
class SearchSpace:
    """A once-for-all MobileNetV3 search space (the YAML keys are the fields below; src/oqat/space/presets/ holds examples, README "Search spaces" the overview)."""

    name: str
    stages: tuple[StageSpec, ...]
    stem_channels: int = 16
    stem_stride: int = 2
    stem_act: str = "h_swish"
    first_block_channels: int = 16
    first_block_act: str = "relu"
    max_depth: int = 4
    depth_choices: tuple[int, ...] = (2, 3, 4)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[int, ...] = (3, 4, 6)
    resolutions: tuple[int, ...] = tuple(range(128, 225, 4))
    final_expand_channels: int = 960
    feature_mix_channels: int = 1280
    se_reduction: int = 4
    channel_divisor: int = 8
    in_channels: int = 3
    num_classes: int = 1000
    # Bits of the first and last layer (the stem conv and the classifier), weights and inputs
    # alike; None keeps them full precision as OQA does. Every other layer follows ``Arch.bits``.
    edge_bits: int | None = None

    KEYS = (
        "name", "stages", "stem_channels", "stem_stride", "stem_act", "first_block_channels",
        "first_block_act", "max_depth", "depth_choices", "kernel_choices", "expand_choices",
        "resolutions", "final_expand_channels", "feature_mix_channels", "se_reduction",
        "channel_divisor", "in_channels", "num_classes", "edge_bits",
    )
    OPTIONAL_KEYS = ("edge_bits",)  # left out of to_dict() when None: older files and hashes stay as they were

    # Sane bounds: a space (from a YAML file, a checkpoint or an exported model's metadata) that
    # exceeds them is refused before any tensor is allocated for it.
    LIMITS = {"stages": 16, "max_depth": 16, "width": 8192, "channels": 16384, "in_channels": 64,
              "num_classes": 100_000, "resolution": 2048, "kernel": 15, "expand": 16}

    # ---------------------------------------------------------------- construction / IO
    def __post_init__(self) -> None:
        where = f"space {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"space: name: expected a non-empty string, got {self.name!r}")
        if not self.stages:
            raise ValueError(f"{where}: stages: at least one stage is required")
        lim = self.LIMITS
        ints = {"max_depth": (self.max_depth, lim["max_depth"]), "stem_stride": (self.stem_stride, 2),
                "in_channels": (self.in_channels, lim["in_channels"]), "num_classes": (self.num_classes, lim["num_classes"]),
                **{n: (getattr(self, n), lim["channels"]) for n in ("stem_channels", "first_block_channels",
                                                                   "final_expand_channels", "feature_mix_channels",
                                                                   "se_reduction", "channel_divisor")}}
        for name, (value, top) in ints.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where}: {name}: expected an integer, got {value!r}")
            if not 0 < value <= top:
                raise ValueError(f"{where}: {name}: must lie in 1..{top}, got {value}")
        if len(self.stages) > lim["stages"]:
            raise ValueError(f"{where}: stages: at most {lim['stages']}, got {len(self.stages)}")
        for i, st in enumerate(self.stages):
            if st.width > lim["width"]:
                raise ValueError(f"{where}: stages[{i}].width: at most {lim['width']}, got {st.width}")
        for name, top in (("kernel_choices", lim["kernel"]), ("expand_choices", lim["expand"]),
                          ("resolutions", lim["resolution"])):
            if any(v > top for v in getattr(self, name)):
                raise ValueError(f"{where}: {name}: values must be at most {top}, got {list(getattr(self, name))}")
        for i, st in enumerate(self.stages):
            if st.act not in ACTIVATIONS:
                raise ValueError(f"{where}: stages[{i}].act: {st.act!r} is not one of {ACTIVATIONS}")
            if st.width <= 0 or st.stride not in (1, 2):
                raise ValueError(f"{where}: stages[{i}]: width must be > 0 and stride 1 or 2, got {st}")
        for name in ("stem_act", "first_block_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"{where}: {name}: {getattr(self, name)!r} is not one of {ACTIVATIONS}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"{where}: stem_stride must be 1 or 2, got {self.stem_stride}")
        eb = self.edge_bits
        if eb is not None and (isinstance(eb, bool) or not isinstance(eb, int) or eb not in QUANT_BITS):
            raise ValueError(f"{where}: edge_bits: {eb!r} is not supported; use one of {list(QUANT_BITS)} "
                             f"(8 is the usual choice) or null for full-precision first and last layers")
        for name in ("depth_choices", "kernel_choices", "expand_choices", "resolutions"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)):
                raise ValueError(f"{where}: {name}: must be a non-empty increasing list, got {list(values)}")
        if max(self.depth_choices) > self.max_depth or min(self.depth_choices) < 1:
            raise ValueError(f"{where}: depth_choices {list(self.depth_choices)} must lie in 1..max_depth={self.max_depth}")
        if any(k % 2 == 0 or k < 1 for k in self.kernel_choices):
            raise ValueError(f"{where}: kernel_choices must be odd, got {list(self.kernel_choices)}")
        if any(e <= 0 for e in self.expand_choices):
            raise ValueError(f"{where}: expand_choices must be positive, got {list(self.expand_choices)}")
        for name in ("stem_channels", "first_block_channels", "final_expand_channels",
                     "feature_mix_channels", "in_channels", "num_classes", "se_reduction", "channel_divisor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        if not isinstance(data, dict):
            raise ValueError(f"space: expected a mapping, got {type(data).__name__}")
        _reject_unknown(data, cls.KEYS, "space")
        if "name" not in data or "stages" not in data:
            raise ValueError("space: 'name' and 'stages' are required")
        kwargs = dict(data)
        stages = []
        for i, st in enumerate(kwargs.pop("stages")):
            if not isinstance(st, dict):
                raise ValueError(f"space: stages[{i}]: expected a mapping, got {st!r}")
            _reject_unknown(st, StageSpec.FIELDS, f"space: stages[{i}]")
            missing = [k for k in StageSpec.FIELDS if k not in st]
            if missing:
                raise ValueError(f"space: stages[{i}]: missing key(s) {missing}")
            for key in ("width", "stride"):
                if isinstance(st[key], bool) or not isinstance(st[key], int):
                    raise ValueError(f"space: stages[{i}].{key}: expected an integer, got {st[key]!r}")
            if not isinstance(st["se"], bool) or not isinstance(st["act"], str):
                raise ValueError(f"space: stages[{i}]: act must be a string and se true/false, got {st!r}")
            stages.append(StageSpec(st["width"], st["stride"], st["act"], st["se"]))
        res = kwargs.get("resolutions")
        if isinstance(res, dict):  # {min, max, step} shorthand
            _reject_unknown(res, ("min", "max", "step"), "space: resolutions")
            lo, hi, step = (res.get(k, d) for k, d in (("min", None), ("max", None), ("step", 4)))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (lo, hi, step)) \
                    or not lo <= hi <= cls.LIMITS["resolution"]:
                raise ValueError(f"space: resolutions: min, max and step must be positive integers with "
                                 f"min <= max <= {cls.LIMITS['resolution']}, got {res}")
            kwargs["resolutions"] = tuple(range(lo, hi + 1, step))
        for name in ("depth_choices", "kernel_choices", "expand_choices", "resolutions"):
            if name in kwargs:
                kwargs[name] = _int_list(kwargs[name], f"space: {name}")
        return cls(stages=tuple(stages), **kwargs)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is None and key in self.OPTIONAL_KEYS:
                continue
            if key == "stages":
                value = [dataclasses.asdict(s) for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        data = load_yaml(path, "search-space file", mapping=False)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @staticmethod
    def preset_names() -> list[str]:
        files = resources.files(__package__).joinpath("presets").iterdir()
        return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SearchSpace":
        """A packaged space (``mbv3-imagenet``, ``mbv3-cifar``, ...), optionally with overrides
        such as ``num_classes=10`` or ``in_channels=1``."""
        if name not in cls.preset_names():
            raise ValueError(f"space preset {name!r} is unknown; available: {cls.preset_names()}")
        text = resources.files(__package__).joinpath("presets").joinpath(f"{name}.yaml").read_text()
        space = cls.from_dict(yaml.safe_load(text))
        return space.replace(**overrides) if overrides else space

    @classmethod
    def resolve(cls, spec: Any, base_dir: str | Path | None = None) -> "SearchSpace":
        """A space from what configs and flags give: a SearchSpace, a preset name, a YAML path
        (relative to the working directory, else to `base_dir`, e.g. the config's folder), an
        inline mapping, or a mapping ``{preset: NAME, <key>: <value>, ...}``: a preset with some
        keys changed (e.g. ``{preset: fmnist-quick, edge_bits: 8}``)."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict) and "preset" in spec:
            name, changes = spec["preset"], {k: v for k, v in spec.items() if k != "preset"}
            if not isinstance(name, str):
                raise ValueError(f"space: preset: expected a preset name, got {name!r}")
            _reject_unknown(changes, cls.KEYS, f"space (preset {name!r})")
            return cls.from_dict({**cls.preset(name).to_dict(), **changes})
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")):
            path = Path(spec)
            if not path.is_file() and base_dir is not None and (Path(base_dir) / path).is_file():
                path = Path(base_dir) / path
            return cls.from_yaml(path)
        if isinstance(spec, str):
            return cls.preset(spec)
        raise ValueError(f"expected a preset name, a YAML path or a mapping, got {spec!r}")

    def replace(self, **changes: Any) -> "SearchSpace":
        _reject_unknown(changes, self.KEYS, "space override")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- structure
    def edge_layer_bits(self, bits: int | None) -> int:
        """Bits of the stem conv and the classifier in a `bits`-bit network of this space: 32 when
        the space keeps them full precision or the network is full precision, else ``edge_bits``."""
        if self.edge_bits is None or normalize_bits(bits) == FULL_PRECISION:
            return FULL_PRECISION
        return self.edge_bits

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_blocks(self) -> int:
        """Number of elastic block slots (``len(arch.ks)``)."""
        return self.num_stages * self.max_depth

    def block_slots(self, stage: int) -> range:
        return range(stage * self.max_depth, (stage + 1) * self.max_depth)

    def hidden_channels(self, in_channels: int, expand: int) -> int:
        return make_divisible(round(in_channels * expand), self.channel_divisor)

    def se_channels(self, channels: int) -> int:
        return make_divisible(channels // self.se_reduction, self.channel_divisor)

    def active_blocks(self, arch: Arch) -> list[int]:
        """Slot indices of the blocks that run in `arch`, in order."""
        return [slot for s in range(self.num_stages) for slot in self.block_slots(s)[: arch.d[s]]]

    # ---------------------------------------------------------------- validation
    def validate(self, arch: Arch) -> Arch:
        """Raise ValueError naming the field and value if `arch` is not in this space."""
        if not isinstance(arch, Arch):
            raise ValueError(f"arch: expected an Arch, got {type(arch).__name__}")
        for name, values, choices in (
            ("ks", arch.ks, self.kernel_choices),
            ("e", arch.e, self.expand_choices),
        ):
            if len(values) != self.num_blocks:
                raise ValueError(f"{name}: expected {self.num_blocks} entries (one per block slot), got {len(values)}")
            for i, v in enumerate(values):
                if v not in choices:
                    raise ValueError(f"{name}[{i}]: {v} is not one of {list(choices)}")
        if len(arch.d) != self.num_stages:
            raise ValueError(f"d: expected {self.num_stages} entries (one per stage), got {len(arch.d)}")
        for i, v in enumerate(arch.d):
            if v not in self.depth_choices:
                raise ValueError(f"d[{i}]: {v} is not one of {list(self.depth_choices)}")
        if arch.r not in self.resolutions:
            lo, hi = self.resolutions[0], self.resolutions[-1]
            step = self.resolutions[1] - lo if len(self.resolutions) > 1 else 0
            raise ValueError(f"r: {arch.r} is not an allowed resolution ({lo}..{hi} in steps of {step})")
        return arch

    def canonical(self, arch: Arch) -> Arch:
        """The same network with unused slots set to the smallest choice: equal networks, equal keys."""
        active = set(self.active_blocks(arch))
        ks = [k if i in active else self.kernel_choices[0] for i, k in enumerate(arch.ks)]
        e = [v if i in active else self.expand_choices[0] for i, v in enumerate(arch.e)]
        return arch.replace(ks=tuple(ks), e=tuple(e))

    def differences(self, other: "SearchSpace") -> str:
        """What differs from `other`, for messages: ``num_classes 10 vs 100, stages[1].width 16 vs 24``."""
        a, b = self.to_dict(), other.to_dict()
        out = []
        for k in self.KEYS:
            if k == "stages" and a[k] != b[k]:
                if len(a[k]) != len(b[k]):
                    out.append(f"{len(a[k])} vs {len(b[k])} stages")
                out += [f"stages[{i}].{f} {x[f]} vs {y[f]}" for i, (x, y) in enumerate(zip(a[k], b[k]))
                        for f in x if x[f] != y[f]]
            elif a.get(k) != b.get(k):
                out.append(f"{k} {a.get(k)} vs {b.get(k)}")
        return ", ".join(out) or "nothing"

    def key(self, arch: Arch) -> str:
        """The canonical arch (unused slots normalised, bits included) as a compact JSON string:
        the one identity of a network for caches, dedupes and file names."""
        return json.dumps(self.canonical(arch).to_dict(), sort_keys=True, separators=(",", ":"))

    # ---------------------------------------------------------------- special subnets
    def largest(self, bits: int | None = FULL_PRECISION) -> Arch:
        n = self.num_blocks
        return Arch(ks=[max(self.kernel_choices)] * n, e=[max(self.expand_choices)] * n,
                    d=[max(self.depth_choices)] * self.num_stages, r=max(self.resolutions), bits=bits)

    def smallest(self, bits: int | None = FULL_PRECISION) -> Arch:
        n = self.num_blocks
        return Arch(ks=[min(self.kernel_choices)] * n, e=[min(self.expand_choices)] * n,
                    d=[min(self.depth_choices)] * self.num_stages, r=min(self.resolutions), bits=bits)

    # ---------------------------------------------------------------- sampling and evolution
    def sample(self, rng: random.Random, bits: int | None = FULL_PRECISION,
               resolution: int | None = None) -> Arch:
        """A uniformly random subnet; pass ``resolution`` to fix r."""
        n = self.num_blocks
        return Arch(
            ks=[rng.choice(self.kernel_choices) for _ in range(n)],
            e=[rng.choice(self.expand_choices) for _ in range(n)],
            d=[rng.choice(self.depth_choices) for _ in range(self.num_stages)],
            r=rng.choice(self.resolutions) if resolution is None else resolution,
            bits=bits,
        )

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.1) -> Arch:
        """Resample each gene (kernel, expand, depth, resolution) independently with prob `prob`."""
        self.validate(arch)
        ks = [rng.choice(self.kernel_choices) if rng.random() < prob else k for k in arch.ks]
        e = [rng.choice(self.expand_choices) if rng.random() < prob else v for v in arch.e]
        d = [rng.choice(self.depth_choices) if rng.random() < prob else v for v in arch.d]
        r = rng.choice(self.resolutions) if rng.random() < prob else arch.r
        return arch.replace(ks=tuple(ks), e=tuple(e), d=tuple(d), r=r)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each gene taken from `a` or `b` with equal probability (bits taken from `a`)."""
        self.validate(a)
        self.validate(b)
        pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
        return a.replace(
            ks=tuple(pick(x, y) for x, y in zip(a.ks, b.ks)),
            e=tuple(pick(x, y) for x, y in zip(a.e, b.e)),
            d=tuple(pick(x, y) for x, y in zip(a.d, b.d)),
            r=pick(a.r, b.r),
        )

    # ---------------------------------------------------------------- size of the space
    def num_archs(self) -> int:
        """Distinct networks (unused slots not counted), excluding the resolution choice."""
        per_block = len(self.kernel_choices) * len(self.expand_choices)
        per_stage = sum(per_block**d for d in self.depth_choices)
        return per_stage**self.num_stages

    def describe(self) -> str:
        n = self.num_archs()
        return (f"{self.name}: {self.num_stages} stages x up to {self.max_depth} blocks, "
                f"{n:.2e} architectures x {len(self.resolutions)} resolutions "
                f"(log10 total {math.log10(n * len(self.resolutions)):.1f})")


def parse_int_list(text: str, name: str) -> list[int]:
    """Parse the OQA-style comma list ``"3,5,7"`` with an error naming the flag."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None


__all__ = ["Arch", "SearchSpace", "StageSpec", "make_divisible", "normalize_bits", "parse_int_list",
           "FULL_PRECISION", "VALID_BITS", "QUANT_BITS"]
