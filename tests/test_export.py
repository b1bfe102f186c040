"""Deployment: ONNX export in QCDQ form, onnxruntime verification, packed low-bit weights, predict.

The supernets here are randomly initialised; one training-mode forward of the largest subnet
initialises every step size, and BN statistics are then re-estimated (cumulative average) on the
exported subnet so its activations are alive. Such random networks are chaotic: a single
rounding flip anywhere cascades through the later layers, so end-to-end top-1 agreement is
only asserted where it is deterministic (full precision, packed round trips); the aligned code
comparison, which a correct export must pass at any bit-width, is asserted everywhere. The
trained-model check of all criteria is the slow test at the end.
"""

from __future__ import annotations

import functools
import json
import random

import numpy as np
import onnx
import pytest
import torch
from helpers import slow_step_groups, split_tensors, train_subnet
from onnx import numpy_helper

from oqat import SearchSpace, build_supernet
from oqat.cli import main
from oqat.export import (
    ExportedModel,
    Preprocessing,
    build_onnx,
    deployable_from_checkpoint,
    export_subnet,
    load_image,
    load_packed,
    pack_bits,
    predict_files,
    read_onnx_info,
    read_packed_info,
    save_packed,
    unpack_bits,
    verify_models,
    verify_onnx,
)
from oqat.export.meta import model_info, preprocessing_for
from oqat.export.verify import VerificationError, _Compare, ort_session, quantizers_of, torch_forward
from oqat.models import Checkpoint
from oqat.quant import LSQQuantizer, qrange

BITS = (2, 3, 4, 8, 32)
SPACE = SearchSpace.preset("mbv3-tiny")
ARCH_SEED = 7
SYNTHETIC = {"name": "synthetic", "image_size": 32, "holdout": 48, "synthetic_size": 160}


def _arch(bits):
    return SPACE.sample(random.Random(ARCH_SEED), bits, resolution=28)


@functools.cache
def _supernet(bits: int):
    """A random 'trained-looking' mbv3-tiny supernet at `bits` (steps set, BN calibrated on the test arch)."""
    torch.manual_seed(bits)
    net = build_supernet(SPACE, bits, impl="eager")
    net.train()
    with torch.no_grad():
        net.set_arch(SPACE.largest(bits))
        net(torch.randn(8, 3, 32, 32))                    # initialises every step size
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None                            # cumulative average
        net.set_arch(_arch(bits))
        for _ in range(2):
            net(torch.randn(24, 3, 28, 28))
        for bn in bns:
            bn.momentum = 0.1
    net.set_arch(SPACE.largest(bits))
    return net.eval()


def _sub(bits):
    return _supernet(bits).extract(_arch(bits)).eval()


def _inputs(n=24, seed=0):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _info(sub, **kw):
    prep, _ = preprocessing_for(sub.space, sub.arch.r, SYNTHETIC)
    return model_info(sub, prep, **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(bits, data=True) -> path of a saved checkpoint of _supernet(bits)."""
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def make(bits, data=True):
        key = (bits, data)
        if key not in cache:
            path = root / f"c{bits}{'d' if data else ''}.pt"
            Checkpoint(space=SPACE, bits=bits, model=_supernet(bits).state_dict(),
                       config={"data": dict(SYNTHETIC)} if data else {}).save(path)
            cache[key] = path
        return cache[key]

    return make


def _arch_file(tmp_path, bits, **extra):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"arch": _arch(bits).to_dict(), **extra}))
    return path


# ----------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip_and_size(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 1001):
        values = rng.integers(0, 1 << bits, n).astype(np.uint8)
        packed = pack_bits(values, bits)
        assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
        np.testing.assert_array_equal(unpack_bits(packed, bits, n), values)


def test_pack_bits_layout_and_errors():
    # 2-bit values 1, 2, 3, 0 -> bits 10 01 11 00 (LSB first) -> byte 0b00111001
    assert pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(np.array([4]), 2)
    with pytest.raises(ValueError, match="need 1 bytes"):
        unpack_bits(np.zeros(0, np.uint8), 3, 2)


# ----------------------------------------------------------------------------------- ONNX graph
def _producer(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_onnx_graph_is_qcdq_with_metadata():
    sub = _sub(4)
    model, codes = build_onnx(sub, info=_info(sub, accuracy=0.5))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    prod = _producer(model)
    quantizers = quantizers_of(sub)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(quantizers)
    assert {c.name for c in codes} == set(quantizers)
    for name, q in quantizers.items():
        qn, qp = qrange(q.bits, q.signed)
        clip = prod[f"{name}.codes"]
        assert clip.op_type == "Clip"
        quant = prod[clip.input[0]]
        assert quant.op_type == "QuantizeLinear"
        lo, hi = inits[clip.input[1]], inits[clip.input[2]]
        assert (int(lo), int(hi)) == (qn, qp)
        assert lo.dtype == (np.int8 if q.signed else np.uint8)
        scale, zp = inits[quant.input[1]], inits[quant.input[2]]
        assert scale == np.float32(q.effective_step().item()) and int(zp) == 0
        assert zp.dtype == lo.dtype
    # every conv fed by a quantized layer takes dequantized input and weight; the stem does not
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        layer = conv.name[: -len(".conv")] if conv.name.endswith(".conv") else None
        quantized = layer is not None and f"{layer}.weight_quant" in quantizers
        src = [prod.get(i) for i in conv.input[:2]]
        if quantized:
            assert all(p is not None and p.op_type == "DequantizeLinear" for p in src), conv.name
        else:
            assert all(p is None or p.op_type != "DequantizeLinear" for p in src), conv.name
    stem = next(n for n in convs if n.name == "stem.conv")
    assert stem.input[0] == "input"
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in sub.modules())
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == n_bn
    # metadata
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["arch"]) == sub.arch.to_dict() and json.loads(props["bits"]) == 4
    assert props["space_name"] == "mbv3-tiny" and json.loads(props["space"]) == SPACE.to_dict()
    assert json.loads(props["accuracy"]) == 0.5
    prep = json.loads(props["preprocessing"])
    assert prep["resolution"] == 28 and prep["in_channels"] == 3 and prep["mean"] == [0.5, 0.5, 0.5]
    # fixed resolution, dynamic batch
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 28, 28]
    session = ort_session(model)
    for n in (1, 3):
        assert session.run(None, {"input": _inputs(n).numpy()})[0].shape == (n, SPACE.num_classes)


@pytest.mark.parametrize("bits", BITS)
def test_onnx_matches_pytorch(bits):
    sub = _sub(bits)
    model, _ = build_onnx(sub)
    x = _inputs()
    report = verify_onnx(model, sub, x, batch_size=12)
    logits, codes = torch_forward(sub, x)
    assert logits.std(0).mean() > 1e-3 * logits.abs().max()      # an alive network, not constant logits
    assert report.images == 24
    quantizers = quantizers_of(sub)
    assert len(report.tensors) == len(quantizers) == (0 if bits == 32 else len(report.tensors))
    if bits != 32:
        assert len(quantizers) > 0
        assert any(codes[n].float().std() > 0 for n in quantizers if n.endswith("act_quant"))
    for t in report.tensors:
        assert t.count > 0 and t.max_diff <= 1 and t.share <= 0.001, t
        if t.kind == "weight":
            assert t.differing == 0 and t.e2e_differing == 0, t
    assert report.aligned_max_abs_diff <= 1e-4 * (1 + report.max_abs_logit)
    if bits == 32:                                               # no rounding to flip: end to end is tight
        assert report.max_abs_diff <= 1e-4 * (1 + report.max_abs_logit)
        assert report.top1_agreement == 1.0
    assert report.ok == (report.top1_agreement >= 0.999)        # the code criteria hold (asserted above)


def test_int8_weight_storage_is_smaller_and_equivalent():
    sub = _sub(4)
    float_model, _ = build_onnx(sub)
    int_model, codes = build_onnx(sub, weights="int8")
    weight_codes = [c for c in codes if c.kind == "weight"]
    assert weight_codes and all(c.initializer for c in weight_codes)
    inits = {i.name: numpy_helper.to_array(i) for i in int_model.graph.initializer}
    for c in weight_codes:
        arr = inits[c.tensor]
        assert arr.dtype == np.int8 and arr.min() >= -8 and arr.max() <= 7
    assert len(int_model.SerializeToString()) < 0.6 * len(float_model.SerializeToString())
    x = _inputs(12)
    s_float = ort_session(float_model, optimize=False).run(None, {"input": x.numpy()})[0]
    s_int = ort_session(int_model, optimize=False).run(None, {"input": x.numpy()})[0]
    np.testing.assert_array_equal(s_float, s_int)
    report = verify_onnx(int_model, sub, x)
    assert all(t.max_diff <= 1 for t in report.tensors) and len(report.tensors) == len(quantizers_of(sub))


def test_unsigned_activations_and_opset(tmp_path):
    """OQA's all-unsigned mode: every activation grid is uint8 [0, 2^b-1]; the packed file keeps the mode."""
    torch.manual_seed(0)
    net = build_supernet(SPACE, 3, unsigned_activations=True, impl="eager")
    arch = SPACE.smallest(3)
    net.train()
    with torch.no_grad():
        net.set_arch(SPACE.largest(3))
        net(torch.randn(4, 3, 32, 32))
    sub = net.extract(arch).eval()
    model, codes = build_onnx(sub, opset=19)
    acts = [c for c in codes if c.kind == "activation"]
    assert acts and all(not c.signed for c in acts)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(inits[f"{c.name}.qmax"] == 7 and inits[f"{c.name}.qmax"].dtype == np.uint8 for c in acts)
    assert model.opset_import[0].version == 19
    x = torch.randn(6, 3, 24, 24)
    report = verify_onnx(model, sub, x)
    assert all(t.max_diff <= 1 and t.share <= 0.001 for t in report.tensors)
    loaded = load_packed(save_packed(sub, tmp_path / "u.oqat", _info(sub)))
    assert loaded.unsigned_activations and torch.equal(torch_forward(loaded, x)[0], torch_forward(sub, x)[0])
    with pytest.raises(ValueError, match="non-empty"):
        verify_onnx(model, sub, x[:0])


def test_verification_detects_a_wrong_scale():
    sub = _sub(4)
    model, _ = build_onnx(sub)
    target = "blocks.1.project.act_quant"
    for init in model.graph.initializer:
        if init.name == f"{target}.scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.7), init.name))
    report = verify_onnx(model, sub, _inputs(12))
    assert not report.ok
    bad = next(t for t in report.tensors if t.name == target)
    assert bad.share > 0.01 and bad.max_diff >= 1
    assert any(target in f for f in report.failures)
    with pytest.raises(VerificationError, match=target):
        verify_onnx(model, sub, _inputs(12), raise_on_failure=True)


def test_verification_rules():
    q = LSQQuantizer(4, signed=True)
    q.initialize(torch.ones(3))

    def run(ort_codes, aligned, logits_ref, logits_out):
        cmp = _Compare("onnxruntime", {"x.act_quant": q}, "test", {})
        cmp.logits(np.array(logits_ref, np.float32), np.array(logits_out, np.float32), None)
        a = np.array(ort_codes)
        cmp.codes("x.act_quant", a, np.array(aligned), np.array(aligned))
        return cmp.finish(0.999, 0.001, 1, None)

    same = [[0, 1]] * 4
    assert run([1] * 2000, [1] * 2000, same, same).ok
    r = run([1] * 2000, [1] * 1998 + [2, 2], same, same)         # 0.1% differ by one: allowed
    assert r.ok and r.tensors[0].differing == 2
    r = run([1] * 2000, [1] * 1997 + [2, 2, 2], same, same)      # 0.15%: too many
    assert not r.ok and "0.150% of codes differ" in r.failures[0]
    r = run([1] * 2000, [1] * 1999 + [3], same, same)            # one code off by two
    assert not r.ok and "differs by 2" in r.failures[0]
    r = run([1], [1], [[0, 1]] * 999 + [[1, 0]], [[0, 1]] * 1000)  # 99.9% top-1: allowed
    assert r.ok and r.top1_agree == 999
    r = run([1], [1], [[0, 1]] * 998 + [[1, 0]] * 2, [[0, 1]] * 1000)
    assert not r.ok and "top-1 agreement 99.80%" in r.failures[0]


# ----------------------------------------------------------------------------------- packed
@pytest.mark.parametrize("bits", BITS)
def test_packed_round_trip(bits, tmp_path):
    sub = _sub(bits)
    path = save_packed(sub, tmp_path / "m.oqat", _info(sub))
    loaded = load_packed(path)
    assert loaded.arch == sub.arch and loaded.bits == bits and loaded.export_info["bits"] == bits
    x = _inputs(12)
    a, ca = torch_forward(sub, x)
    b, cb = torch_forward(loaded, x)
    assert torch.equal(a, b)
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    report = verify_models(sub, loaded, x)
    assert report.ok and report.max_abs_diff == 0 and report.codes_differing == 0
    info = read_packed_info(path)
    assert info["arch"] == sub.arch.to_dict() and info["space_name"] == "mbv3-tiny"
    assert set(info["quantizers"]) == set(quantizers_of(sub))
    for key, spec in info["packed"].items():
        n = int(np.prod(spec["shape"]))
        assert spec["bits"] == bits
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            assert f.get_tensor(key + ".codes").size == (n * bits + 7) // 8
    assert (len(info["packed"]) > 0) == (bits != 32)


def test_packed_sizes_shrink_with_bits(tmp_path):
    sizes = {b: save_packed(_sub(b), tmp_path / f"m{b}.oqat", _info(_sub(b))).stat().st_size for b in BITS}
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8] < sizes[32]
    # the quantized weights shrink b/32: the saving from 8 to 4 bits is half the saving from 4 to 0
    from oqat.nn.layers import QConvBN

    q_weights = sum(m.weight.numel() for m in _sub(4).modules() if isinstance(m, QConvBN) and m.weight_quant)
    assert abs((sizes[8] - sizes[4]) - q_weights * 4 / 8) < 0.02 * q_weights


def test_load_packed_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_packed(tmp_path / "none.oqat")
    junk = tmp_path / "junk.oqat"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.oqat"):
        load_packed(junk)


# ----------------------------------------------------------------------------------- preprocessing
def test_preprocessing_from_data_config_and_defaults():
    prep, note = preprocessing_for(SPACE, 28, {"name": "cifar10", "root": "/nowhere"})
    assert note is None and prep.mean == (0.4914, 0.4822, 0.4465) and prep.crop_fraction == 1.0
    prep, note = preprocessing_for(SPACE, 28, {"name": "imagefolder", "root": "/x"})
    assert prep.crop_fraction == 0.875 and prep.std == (0.229, 0.224, 0.225)
    prep, note = preprocessing_for(SPACE, 28, None)
    assert "no data config" in note and prep.mean == (0.485, 0.456, 0.406)
    gray, _ = preprocessing_for(SPACE.replace(in_channels=1), 28, {"name": "fashion-mnist"})
    assert gray.in_channels == 1 and gray.mean == (0.2860,)


def test_load_image_grayscale_and_crop(tmp_path):
    from PIL import Image

    rgb = (np.random.default_rng(0).random((10, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    gray = Preprocessing(resolution=10, in_channels=1, mean=(0.5,), std=(0.25,))
    x = load_image(tmp_path / "a.png", gray)
    expected = (np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255 - 0.5) / 0.25
    assert x.shape == (1, 10, 10)
    np.testing.assert_allclose(x.numpy()[0], expected[:, :10], atol=5)  # shape/scale check, resized
    square = Preprocessing(resolution=8, in_channels=3, mean=(0, 0, 0), std=(1, 1, 1), crop_fraction=0.5)
    y = load_image(tmp_path / "a.png", square)                   # shorter side 16, centre crop 8
    assert y.shape == (3, 8, 8) and float(y.min()) >= 0 and float(y.max()) <= 1
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png", square)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        load_image(tmp_path / "bad.jpg", square)


# ----------------------------------------------------------------------------------- CLI
def _images(tmp_path, n=3):
    from PIL import Image

    paths = []
    for i in range(n):
        arr = (np.random.default_rng(i).random((30 + i, 26, 3)) * 255).astype(np.uint8)
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def _expected_probs(sub, prep, images):
    x = torch.stack([load_image(p, prep) for p in images])
    with torch.no_grad():
        return torch.softmax(sub(x).double(), 1).numpy()


def test_cli_export_onnx_full_precision_and_predict(ckpt, tmp_path, capsys):
    out = tmp_path / "fp.onnx"
    arch = _arch_file(tmp_path, 32, accuracy=0.61)
    rc = main(["export", "--ckpt", str(ckpt(32)), "--arch", str(arch), "-o", str(out), "--verify-images", "16",
               "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and out.is_file() and result["size_bytes"] == out.stat().st_size
    v = result["verification"]
    assert v["ok"] and v["images"] == 16 and "held-out images of synthetic" in v["inputs"]
    assert v["top1_agreement"] == 1.0 and v["max_abs_diff"] < 1e-4
    info = read_onnx_info(out)
    assert info["accuracy"] == 0.61 and info["class_names"][:2] == ["class0", "class1"]
    assert info["source"]["checkpoint"] == str(ckpt(32)) and info["arch"]["bits"] == 32
    # the defaults of oqat eval: every held-out image (48 < 2000) in batches of 100, seed 0
    assert info["bn_calibration"] == {"recalibrated": True, "split": "holdout", "images": 48, "batch": 100,
                                      "seed": 0, "data": "synthetic"} == result["bn_calibration"]
    images = _images(tmp_path)
    rc = main(["predict", str(out), *map(str, images), "--top", "2", "--json"])
    preds = json.loads(capsys.readouterr().out)
    assert rc == 0 and [p["file"] for p in preds] == list(map(str, images))
    measured = deployable_from_checkpoint(ckpt(32), _arch(32)).sub        # what oqat eval measures
    expected = _expected_probs(measured, ExportedModel(out).preprocessing, images)
    for p, e in zip(preds, expected):
        assert p["class"] == int(e.argmax()) and p["name"] == f"class{p['class']}"
        assert abs(p["probability"] - e.max()) < 1e-5 and len(p["top"]) == 2


def test_cli_export_packed_and_predict(ckpt, tmp_path, capsys):
    out = tmp_path / "m.oqat"
    args = ["export", "--ckpt", str(ckpt(3, data=False)), "--arch", str(_arch_file(tmp_path, 3)),
            "--format", "oqat", "-o", str(out), "--verify-images", "8"]
    assert main(args) == 2 and not out.exists()                  # no data: no re-calibration, so refused
    err = capsys.readouterr().err
    assert "no 'data' section" in err and "--no-recalibrate" in err and "c3.pt" in err
    assert main(args + ["--no-recalibrate"]) == 0 and out.is_file()
    text = capsys.readouterr().out
    assert "packed round trip" in text and "PASSED" in text and "random standard-normal" in text
    assert "no data config" in text                              # the note about defaults
    assert "NOT re-calibrated" in text
    assert read_packed_info(out)["bn_calibration"] == {"recalibrated": False, "reason": "--no-recalibrate"}
    images = _images(tmp_path, 2)
    rc = main(["predict", str(out), *map(str, images), "--json"])
    preds = json.loads(capsys.readouterr().out)
    expected = _expected_probs(_sub(3), ExportedModel(out).preprocessing, images)
    assert rc == 0 and [p["class"] for p in preds] == expected.argmax(1).tolist()
    assert all(p["name"] is None for p in preds)
    np.testing.assert_allclose([p["probability"] for p in preds], expected.max(1), atol=1e-6)


def test_cli_export_fails_loudly(ckpt, tmp_path, capsys, monkeypatch):
    import oqat.export.onnx as exporter

    real = exporter._scale_value
    monkeypatch.setattr(exporter, "_scale_value", lambda q: real(q) * np.float32(1.5))
    out = tmp_path / "bad.onnx"
    rc = main(["export", "--ckpt", str(ckpt(4)), "--arch", str(_arch_file(tmp_path, 4)), "-o", str(out),
               "--verify-images", "8"])
    captured = capsys.readouterr()
    assert rc == 2 and "FAILED verification" in captured.err and "codes differ" in captured.err
    assert not out.exists() and (tmp_path / "bad.unverified.onnx").is_file()
    assert "FAILED" in captured.out                              # the figures are printed too


def test_cli_errors(ckpt, tmp_path, capsys):
    rc = main(["export", "--ckpt", str(ckpt(4)), "--smallest", "--bits", "2", "-o", str(tmp_path / "x.onnx")])
    assert rc == 2 and "4-bit supernet" in capsys.readouterr().err
    rc = main(["export", "--ckpt", str(tmp_path / "none.pt"), "--smallest", "-o", str(tmp_path / "x.onnx")])
    assert rc == 2 and "none.pt" in capsys.readouterr().err
    rc = main(["export", "--ckpt", str(ckpt(4)), "--smallest", "--format", "oqat", "--float-weights", "int8",
               "-o", str(tmp_path / "x.oqat")])
    assert rc == 2 and "--float-weights" in capsys.readouterr().err and not (tmp_path / "x.oqat").exists()
    model = tmp_path / "m.oqat"
    save_packed(_sub(2), model, _info(_sub(2)))
    rc = main(["predict", str(model), str(tmp_path / "nope.png")])
    assert rc == 2 and "nope.png: image file not found" in capsys.readouterr().err
    rc = main(["predict", str(tmp_path / "nomodel.onnx"), str(tmp_path / "nope.png")])
    assert rc == 2 and "nomodel.onnx: model file not found" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ("onnx", "onnx-int", "oqat"))
def test_export_refuses_non_finite_weights(fmt, tmp_path):
    """A diverged subnet (here a NaN depthwise weight) is refused in one line naming the tensor,
    before any file is written (it used to stop deep in the code split with "cannot convert float
    NaN to integer")."""
    sub = _sub(3)
    with torch.no_grad():
        sub.first_block.depthwise.weight[0, 0, 0, 0] = float("nan")
    out = tmp_path / f"m.{'oqat' if fmt == 'oqat' else 'onnx'}"
    with pytest.raises(ValueError, match=r"cannot export: NaN or infinite values in first_block\.depthwise\.weight"):
        export_subnet(sub, out, fmt, verify=False)
    assert list(tmp_path.iterdir()) == []


def test_predict_files_batches_and_top_k(tmp_path):
    sub = _sub(8)
    model = tmp_path / "m.onnx"
    export_subnet(sub, model, "onnx", config={"data": dict(SYNTHETIC)}, verify=False)
    images = _images(tmp_path, 3)
    preds = predict_files(model, images, top_k=3, batch_size=2)
    probs = [[t[2] for t in p.top] for p in preds]
    assert len(preds) == 3 and all(len(p) == 3 and p == sorted(p, reverse=True) for p in probs)
    with pytest.raises(ValueError, match="top"):
        predict_files(model, images, top_k=0)


# ----------------------------------------------------------------------------------- trained (slow)
@pytest.mark.slow
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_trained_subnet_passes_every_criterion(bits, tmp_path):
    """A subnet trained for a few steps on synthetic data has real margins: the full rule
    (top-1 >= 99.9% end to end, aligned codes) holds on held-out images."""
    from oqat import data as D

    torch.manual_seed(0)  # first: the training split's augmentation draws from the global generator
    data = D.build_data(D.DataConfig.from_dict({**SYNTHETIC, "synthetic_size": 640, "holdout": 128}))
    x_all, y_all = split_tensors(data.train)
    net = build_supernet(SPACE, bits, impl="eager")
    arch = _arch(bits)
    # slow steps: with full-rate ones the 3-bit net trained on one thread diverged to NaN weights
    sgd = lambda _: torch.optim.SGD(slow_step_groups(net, 0.02), lr=0.02, momentum=0.9)  # noqa: E731
    train_subnet(net, SPACE, arch, x_all, y_all, sgd, steps=60)
    sub = net.extract(arch).eval()
    result = export_subnet(sub, tmp_path / "m.onnx", config={"data": {**SYNTHETIC, "synthetic_size": 640,
                                                                      "holdout": 128}}, verify_images=128)
    assert result.report.ok and result.report.images == 128
