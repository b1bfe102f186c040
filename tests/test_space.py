"""Search space and Arch: JSON round trip, validation errors, seeded sampling and evolution."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oqat import Arch, SearchSpace

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
PRESETS = SearchSpace.preset_names()


# ----------------------------------------------------------------------------- presets
def test_presets_are_packaged_and_load():
    assert {"mbv3-imagenet", "mbv3-cifar", "mbv3-tiny"} <= set(PRESETS)
    for name in PRESETS:
        space = SearchSpace.preset(name)
        assert space.name == name
        assert space.validate(space.largest(4)) == space.largest(4)
        assert space.validate(space.smallest(None)).bits == 32
        assert SearchSpace.from_dict(space.to_dict()) == space
        json.dumps(space.to_dict())  # JSON-compatible


def test_imagenet_preset_is_the_ofa_space(imagenet_space):
    s = imagenet_space
    assert [st_.width for st_ in s.stages] == [24, 40, 80, 112, 160]
    assert [st_.stride for st_ in s.stages] == [2, 2, 2, 1, 2]
    assert [st_.act for st_ in s.stages] == ["relu", "relu", "h_swish", "h_swish", "h_swish"]
    assert [st_.se for st_ in s.stages] == [False, True, False, True, True]
    assert s.num_blocks == 20 and s.num_stages == 5
    assert s.resolutions == tuple(range(128, 225, 4)) and len(s.resolutions) == 25
    # (3 kernels x 3 expands)^d summed over d in {2,3,4}, per stage, five stages
    assert 9**2 + 9**3 + 9**4 == 7371
    assert s.num_archs() == 7371**5


def test_preset_overrides_and_unknown_preset():
    space = SearchSpace.preset("mbv3-tiny", num_classes=7, in_channels=1)
    assert (space.num_classes, space.in_channels) == (7, 1)
    with pytest.raises(ValueError, match="no-such-space"):
        SearchSpace.preset("no-such-space")
    with pytest.raises(ValueError, match="colour"):
        SearchSpace.preset("mbv3-tiny", colour=3)


def test_space_from_dict_rejects_unknown_key_and_bad_activation(tiny_space):
    d = tiny_space.to_dict()
    with pytest.raises(ValueError, match=r"unknown key.*'widht'"):
        SearchSpace.from_dict({**d, "widht": 3})
    bad = tiny_space.to_dict()
    bad["stages"][2]["act"] = "gelu"
    with pytest.raises(ValueError, match=r"stages\[2\]\.act.*'gelu'"):
        SearchSpace.from_dict(bad)
    bad = tiny_space.to_dict()
    bad["stages"][0]["depth"] = 3
    with pytest.raises(ValueError, match=r"stages\[0\].*'depth'"):
        SearchSpace.from_dict(bad)


def test_space_yaml_file(tmp_path, tiny_space):
    import yaml

    path = tmp_path / "space.yaml"
    d = tiny_space.to_dict()
    d["resolutions"] = {"min": 20, "max": 32, "step": 6}
    path.write_text(yaml.safe_dump(d))
    space = SearchSpace.from_yaml(path)
    assert space.resolutions == (20, 26, 32)
    with pytest.raises(ValueError, match="missing.yaml"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")
    d["kernel_choices"] = [3, 4]
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ValueError, match=r"space.yaml.*kernel_choices"):
        SearchSpace.from_yaml(path)


# ----------------------------------------------------------------------------- Arch IO
def test_arch_dict_and_file_round_trip(tmp_path, imagenet_space, oqa_arch):
    rng = random.Random(3)
    for arch in [oqa_arch, imagenet_space.largest(2), imagenet_space.sample(rng, bits=None)]:
        assert Arch.from_dict(arch.to_dict()) == arch
        assert Arch.from_dict(json.loads(arch.to_json())) == arch
        path = tmp_path / "arch.json"
        arch.save(path)
        assert Arch.load(path) == arch
    # a search-output file holding {"arch": {...}, ...} loads too
    (tmp_path / "result.json").write_text(json.dumps({"arch": oqa_arch.to_dict(), "acc": 0.5}))
    assert Arch.load(tmp_path / "result.json") == oqa_arch
    # bits default to full precision, None means 32
    d = oqa_arch.to_dict()
    del d["bits"]
    assert Arch.from_dict(d).bits == 32
    assert Arch.from_dict({**d, "bits": None}).bits == 32
    assert not Arch.from_dict(d).quantized and oqa_arch.quantized


def test_arch_load_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        Arch.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ks: [3")
    with pytest.raises(ValueError, match="bad.json.*JSON"):
        Arch.load(bad)
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"ks": [3], "e": [3], "d": [2], "r": 32, "width": 1}))
    with pytest.raises(ValueError, match=r"extra.json.*unknown key.*'width'"):
        Arch.load(extra)


def test_arch_from_dict_rejects_unknown_and_missing_keys(oqa_arch):
    with pytest.raises(ValueError, match=r"unknown key.*'kernel'"):
        Arch.from_dict({**oqa_arch.to_dict(), "kernel": 3})
    d = oqa_arch.to_dict()
    del d["r"]
    with pytest.raises(ValueError, match=r"missing.*'r'"):
        Arch.from_dict(d)
    with pytest.raises(ValueError, match=r"ks\[1\].*'5'"):
        Arch.from_dict({**oqa_arch.to_dict(), "ks": [3, "5"]})
    with pytest.raises(ValueError, match=r"r:.*'128'"):
        Arch.from_dict({**oqa_arch.to_dict(), "r": "128"})


# ----------------------------------------------------------------------------- validation
def _with(arch: Arch, field: str, index: int | None, value):
    if index is None:
        return arch.replace(**{field: value})
    values = list(getattr(arch, field))
    values[index] = value
    return arch.replace(**{field: tuple(values)})


@pytest.mark.parametrize("field,index,value,pattern", [
    ("ks", 4, 4, r"ks\[4\]: 4 is not one of \[3, 5, 7\]"),
    ("e", 17, 5, r"e\[17\]: 5 is not one of \[3, 4, 6\]"),
    ("d", 2, 5, r"d\[2\]: 5 is not one of \[2, 3, 4\]"),
    ("d", 0, 1, r"d\[0\]: 1 is not one of"),
    ("r", None, 130, r"r: 130 is not an allowed resolution"),
    ("r", None, 300, r"r: 300 is not an allowed resolution"),
    ("r", None, 124, r"r: 124 is not an allowed resolution"),
])
def test_validate_names_field_and_value(imagenet_space, oqa_arch, field, index, value, pattern):
    bad = _with(oqa_arch, field, index, value)
    with pytest.raises(ValueError, match=pattern):
        imagenet_space.validate(bad)


@pytest.mark.parametrize("field,length", [("ks", 19), ("e", 21), ("d", 4), ("d", 6)])
def test_validate_wrong_list_length(imagenet_space, oqa_arch, field, length):
    values = (list(getattr(oqa_arch, field)) * 2)[:length]
    with pytest.raises(ValueError, match=rf"{field}: expected \d+ entries.*got {length}"):
        imagenet_space.validate(oqa_arch.replace(**{field: tuple(values)}))


@pytest.mark.parametrize("bits", [9, 1, 0, 16, 33, True, 4.0, "4"])
def test_bad_bits_rejected(oqa_arch, bits):
    with pytest.raises(ValueError, match=rf"bits: {bits!r}".replace("(", r"\(").replace(".", r"\.")):
        Arch(ks=oqa_arch.ks, e=oqa_arch.e, d=oqa_arch.d, r=oqa_arch.r, bits=bits)


def test_validate_rejects_non_arch(imagenet_space, oqa_arch):
    with pytest.raises(ValueError, match="expected an Arch"):
        imagenet_space.validate(oqa_arch.to_dict())


def test_arch_from_other_space_is_rejected(tiny_space, imagenet_space):
    arch = tiny_space.largest(4)  # same slot counts, resolution 32 is not an ImageNet one
    with pytest.raises(ValueError, match="r: 32"):
        imagenet_space.validate(arch)


# ----------------------------------------------------------------------------- sampling
def test_special_subnets(imagenet_space):
    big, small = imagenet_space.largest(4), imagenet_space.smallest(4)
    assert set(big.ks) == {7} and set(big.e) == {6} and set(big.d) == {4} and big.r == 224
    assert set(small.ks) == {3} and set(small.e) == {3} and set(small.d) == {2} and small.r == 128
    assert big.bits == small.bits == 4
    assert imagenet_space.active_blocks(small) == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17]
    assert imagenet_space.active_blocks(big) == list(range(20))


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS)
def test_seeded_sampling_is_reproducible(seed):
    space = SearchSpace.preset("mbv3-imagenet")
    a = [space.sample(random.Random(seed), bits=4) for _ in range(2)]
    assert a[0] == a[1]
    rng1, rng2 = random.Random(seed), random.Random(seed)
    seq1 = [space.sample(rng1, bits=2) for _ in range(5)]
    seq2 = [space.sample(rng2, bits=2) for _ in range(5)]
    assert seq1 == seq2
    assert len(set(seq1)) == 5  # 2e19 archs: repeats would mean a broken sampler
    other = space.sample(random.Random(seed + 1), bits=4)
    assert other != a[0]
    fixed = space.sample(random.Random(seed), bits=4, resolution=160)
    assert fixed.r == 160


def test_sampling_covers_all_choices(imagenet_space):
    rng = random.Random(0)
    archs = [imagenet_space.sample(rng) for _ in range(200)]
    assert {k for a in archs for k in a.ks} == {3, 5, 7}
    assert {v for a in archs for v in a.e} == {3, 4, 6}
    assert {v for a in archs for v in a.d} == {2, 3, 4}
    assert len({a.r for a in archs}) > 20


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS, space_name=st.sampled_from(PRESETS), prob=st.floats(0.0, 1.0))
def test_sample_mutate_crossover_stay_valid(seed, space_name, prob):
    space = SearchSpace.preset(space_name)
    rng = random.Random(seed)
    a, b = space.sample(rng, bits=4), space.sample(rng, bits=4)
    for arch in (a, b, space.mutate(a, rng, prob), space.crossover(a, b, rng)):
        assert space.validate(arch) is arch
        assert arch.bits == 4
    # mutation and crossover are seeded too
    assert space.mutate(a, random.Random(seed), prob) == space.mutate(a, random.Random(seed), prob)
    assert space.crossover(a, b, random.Random(seed)) == space.crossover(a, b, random.Random(seed))


@settings(max_examples=60, deadline=None)
@given(seed=SEEDS)
def test_crossover_genes_come_from_parents(seed):
    space = SearchSpace.preset("mbv3-imagenet")
    rng = random.Random(seed)
    a, b = space.sample(rng, bits=3), space.sample(rng, bits=3)
    child = space.crossover(a, b, rng)
    for field in ("ks", "e", "d"):
        for i, gene in enumerate(getattr(child, field)):
            assert gene in (getattr(a, field)[i], getattr(b, field)[i])
    assert child.r in (a.r, b.r)


def test_crossover_mixes_and_mutation_rates(imagenet_space):
    rng = random.Random(0)
    a, b = imagenet_space.largest(4), imagenet_space.smallest(4)
    child = imagenet_space.crossover(a, b, rng)
    assert {7, 3} == set(child.ks)  # genes from both parents
    assert imagenet_space.mutate(a, rng, prob=0.0) == a
    mutated = [imagenet_space.mutate(a, rng, prob=1.0) for _ in range(20)]
    assert all(m != a for m in mutated)
    # with prob p about p * 2/3 of the kernel genes change (the resample may pick the same value)
    changed = sum(k != 7 for _ in range(50) for k in imagenet_space.mutate(a, rng, prob=0.3).ks)
    assert 0.1 < changed / (50 * 20) < 0.3


def test_mutate_and_crossover_reject_invalid_parents(imagenet_space, oqa_arch):
    bad = _with(oqa_arch, "ks", 0, 4)
    with pytest.raises(ValueError, match=r"ks\[0\]: 4"):
        imagenet_space.mutate(bad, random.Random(0))
    with pytest.raises(ValueError, match=r"ks\[0\]: 4"):
        imagenet_space.crossover(oqa_arch, bad, random.Random(0))


# ----------------------------------------------------------------------------- canonical form
@settings(max_examples=40, deadline=None)
@given(seed=SEEDS)
def test_canonical_ignores_unused_slots(seed):
    space = SearchSpace.preset("mbv3-imagenet")
    rng = random.Random(seed)
    arch = space.sample(rng, bits=4)
    active = set(space.active_blocks(arch))
    # scramble every unused slot
    ks = [k if i in active else rng.choice(space.kernel_choices) for i, k in enumerate(arch.ks)]
    e = [v if i in active else rng.choice(space.expand_choices) for i, v in enumerate(arch.e)]
    twin = arch.replace(ks=tuple(ks), e=tuple(e))
    assert space.canonical(twin) == space.canonical(arch)
    assert hash(space.canonical(twin)) == hash(space.canonical(arch))
    canon = space.canonical(arch)
    assert space.canonical(canon) == canon
    assert [canon.ks[i] for i in sorted(active)] == [arch.ks[i] for i in sorted(active)]
    assert all(canon.ks[i] == 3 and canon.e[i] == 3 for i in range(20) if i not in active)
    # a change in a used slot is a different network
    slot = sorted(active)[0]
    other_k = 5 if arch.ks[slot] != 5 else 7
    assert space.canonical(_with(arch, "ks", slot, other_k)) != canon
