"""OpenVINO as the engine of QCDQ files: checked at export, recorded in the metadata, picked by
``oqat predict``, timed in the deployment table."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper
from test_export_int import _trained

from oqat.cli import main
from oqat.export import ExportedModel, export_subnet
from oqat.export import openvino_check as ovc
from oqat.export.deployment import DeploymentFiles, DeploymentRow, deployment_row, fp32_reference
from oqat.export.meta import to_string_map
from oqat.export.onnx import export_onnx, read_onnx_info
from oqat.export.predict import choose_engine
from oqat.export.verify import VerificationData, torch_forward

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def qcdq(tmp_path_factory):
    """A verified 4-bit QCDQ file of the trained test subnet, with its subnet and held-out data."""
    sub, x, y = _trained(4)
    out = tmp_path_factory.mktemp("ov") / "q.onnx"
    res = export_subnet(sub, out, "onnx", verification=VerificationData(x, y, "held-out"), weights="int8",
                        calibration={"recalibrated": True}, progress=False)
    return res, sub, x, y


def test_export_checks_the_qcdq_file_on_openvino_and_records_it(qcdq):
    res, sub, x, y = qcdq
    rec = read_onnx_info(res.path)["openvino"]
    assert rec == res.info["openvino"]
    assert rec["verified"] is True and rec["version"] == ovc.version()
    assert rec["integer_convs"] == rec["quantized_convs"] > 0 and rec["top1_agreement"] >= 0.995


def test_auto_engine_runs_a_verified_qcdq_file_on_openvino_with_the_subnets_answers(qcdq):
    res, sub, x, y = qcdq
    model = ExportedModel(res.path)
    assert model.engine.startswith("OpenVINO")
    ref, _ = torch_forward(sub, x)
    # any batch size (one compiled model per size): 1, an odd 7, the whole set
    parts = [model.logits(x[:1].numpy()), model.logits(x[1:8].numpy()), model.logits(x[8:].numpy())]
    out = np.concatenate(parts)
    assert out.shape == (x.shape[0], ref.shape[1])
    assert (out.argmax(1) == ref.numpy().argmax(1)).mean() >= 0.995
    ort = ExportedModel(res.path, engine="onnxruntime")
    assert ort.engine.startswith("onnxruntime")
    assert (ort.logits(x.numpy()).argmax(1) == out.argmax(1)).mean() >= 0.995


def test_auto_engine_keeps_onnxruntime_without_a_passed_openvino_check(qcdq, tmp_path):
    res, sub, x, y = qcdq
    plain = export_subnet(sub, tmp_path / "plain.onnx", "onnx", verification=VerificationData(x, y, "held-out"),
                          weights="int8", calibration={"recalibrated": True}, progress=False, openvino=False)
    assert "openvino" not in plain.info and ExportedModel(plain.path).engine.startswith("onnxruntime")
    failed = onnx.load(str(res.path))
    info = {**read_onnx_info(res.path), "openvino": {"verified": False}}
    helper.set_model_props(failed, to_string_map(info))       # replaces the file's metadata
    onnx.save_model(failed, str(tmp_path / "failed.onnx"))
    assert ExportedModel(tmp_path / "failed.onnx").engine.startswith("onnxruntime")
    # an explicit choice is the user's: OpenVINO runs the file anyway
    assert ExportedModel(tmp_path / "failed.onnx", engine="openvino").engine.startswith("OpenVINO")
    assert choose_engine({"integer": {}, "openvino": {"verified": True}}) == "onnxruntime"
    for odd in ("verified", ["verified"], {"verified": "yes"}, None, 1):      # hostile or damaged metadata
        assert choose_engine({"openvino": odd}) == "onnxruntime"


def test_a_failed_openvino_check_is_a_note_not_an_error(qcdq, tmp_path, monkeypatch):
    res, sub, x, y = qcdq
    real = ovc.verify_openvino

    def failing(*a, **k):
        rep = real(*a, **k)
        rep.failures.append("injected failure")
        return rep

    monkeypatch.setattr(ovc, "verify_openvino", failing)
    r = export_subnet(sub, tmp_path / "f.onnx", "onnx", verification=VerificationData(x, y, "held-out"),
                      weights="int8", calibration={"recalibrated": True}, progress=False)
    assert r.path.is_file() and r.report.ok
    assert r.info["openvino"]["verified"] is False and r.info["openvino"]["failures"] == ["injected failure"]
    assert any("OpenVINO check FAILED (injected failure)" in n for n in r.notes)
    assert ExportedModel(r.path).engine.startswith("onnxruntime")


def test_an_engine_that_crashes_in_the_check_costs_no_file(qcdq, tmp_path, monkeypatch):
    res, sub, x, y = qcdq

    def crashing(*a, **k):
        raise RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp")

    monkeypatch.setattr(ovc, "verify_openvino", crashing)
    r = export_subnet(sub, tmp_path / "c.onnx", "onnx", verification=VerificationData(x, y, "held-out"),
                      calibration={"recalibrated": True}, progress=False)
    assert r.path.is_file() and r.report.ok and r.info["openvino"]["verified"] is False
    assert any(n.startswith("OpenVINO check not run (RuntimeError: Exception from") for n in r.notes)
    assert ExportedModel(r.path).engine.startswith("onnxruntime")


def test_auto_falls_back_to_onnxruntime_when_openvino_cannot_load_the_file(qcdq, monkeypatch):
    res, sub, x, y = qcdq

    def refuse(path, threads=1):
        raise ValueError(f"{path}: OpenVINO 9.9 cannot compile it for CPU (injected)")

    monkeypatch.setattr(ovc, "OpenVINOModel", refuse)
    with pytest.warns(UserWarning, match=r"cannot compile it for CPU \(injected\); running it on onnxruntime"):
        model = ExportedModel(res.path)
    assert model.engine.startswith("onnxruntime") and model.logits(x[:2].numpy()).shape[0] == 2
    with pytest.raises(ValueError, match="injected"):          # asked for by name: no silent substitute
        ExportedModel(res.path, engine="openvino")


def test_bad_engine_choices_are_clear_errors(qcdq, tmp_path, capsys):
    res, sub, x, y = qcdq
    with pytest.raises(ValueError, match="engine: 'tensorrt' is not one of"):
        ExportedModel(res.path, engine="tensorrt")
    from oqat.export.packed import save_packed

    packed = save_packed(sub, tmp_path / "m.oqat", res.info)
    with pytest.raises(ValueError, match=r"m\.oqat: a packed \.oqat model runs on PyTorch; engine 'openvino'"):
        ExportedModel(packed, engine="openvino")
    assert ExportedModel(packed).engine.startswith("PyTorch")
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["predict", str(packed), str(img), "--engine", "openvino"]) == 2
    assert "runs on PyTorch" in capsys.readouterr().err
    assert main(["predict", str(res.path), str(img), "--threads", "0"]) == 2
    assert "--threads: expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["predict", str(res.path), str(img), "--engine", "openvino", "--threads", "1", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)[0]["class"] < sub.space.num_classes


def test_deployment_row_times_fp32_and_qcdq_on_openvino_against_its_own_fp32(qcdq, tmp_path):
    res, sub, x, y = qcdq
    fp = export_onnx(fp32_reference(sub), tmp_path / "fp.onnx")
    row = deployment_row(DeploymentFiles(fp32=fp, qcdq=res.path), subnet="t", bits=4, resolution=24, runs=2,
                         batches=(1, 2))
    assert row.openvino == ovc.version()
    assert set(row.latency_ms) == {"fp32", "qcdq", "openvino-fp32", "openvino-qcdq"}
    lat = row.latency_ms
    assert row.speedup("openvino-qcdq", 2) == pytest.approx(lat["openvino-fp32"]["2"] / lat["openvino-qcdq"]["2"])
    assert row.speedup("qcdq", 2) == pytest.approx(lat["fp32"]["2"] / lat["qcdq"]["2"])
    assert "| qcdq on OpenVINO |" in row.table() and "| fp32 on OpenVINO |" in row.table()
    again = DeploymentRow.from_dict(json.loads(json.dumps(row.to_dict())))
    assert again == row
    none = deployment_row(DeploymentFiles(fp32=fp, qcdq=res.path), subnet="t", bits=4, resolution=24, runs=1,
                          batches=(1,), openvino=False)
    assert set(none.latency_ms) == {"fp32", "qcdq"} and none.openvino == ""


def test_a_compiled_model_is_reused_until_the_file_changes(qcdq, tmp_path):
    res, sub, x, y = qcdq
    path = tmp_path / "same.onnx"
    path.write_bytes(res.path.read_bytes())
    first = ovc.compile_file(path, 2)
    assert ovc.compile_file(path, 2) is first                     # the same file, batch and threads
    assert ovc.compile_file(path, 3) is not first
    assert ovc.compile_file(path, 2, threads=2) is not first
    a, b = ovc.OpenVINOModel(path), ovc.OpenVINOModel(path)       # one compiled model, two infer requests
    np.testing.assert_array_equal(a(x[:2].numpy()), b(x[:2].numpy()))
    tmp = tmp_path / "other.onnx"                                  # rewritten as export does: a new file
    tmp.write_bytes(res.path.read_bytes())
    tmp.replace(path)
    assert ovc.compile_file(path, 2) is not first
