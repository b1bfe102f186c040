"""oqat run: the whole pipeline on configs/ci-tiny.yaml (synthetic data, a few steps per stage),
stage markers and skipping, recovery after an interruption, config errors, the report."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_oqat

from oqat import Arch
from oqat.data import DataConfig
from oqat.export import openvino_check as ovc
from oqat.models import load_checkpoint
from oqat.pipeline import (
    Pipeline,
    StageMismatch,
    config_from_dict,
    load_run_config,
    read_marker,
    run_pipeline,
    run_space,
)
from oqat.search import Budget
from oqat.space import cost
from oqat.training import load_train_config

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "configs" / "ci-tiny.yaml"
STAGES = ["fp", "supernet-4bit", "supernet-3bit", "supernet-2bit", "search-4bit", "search-3bit", "search-2bit",
          "baseline", "export"]


def _raw() -> dict:
    return yaml.safe_load(CI.read_text())


def _run(out: Path, raw: dict | None = None, **kw):
    lines: list[str] = []
    res = run_pipeline(raw if raw is not None else CI, out, progress=False, echo=lines.append, **kw)
    return res, lines


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    res, lines = _run(out)
    return out, res, lines


def _markers(out: Path) -> dict:
    return {s: read_marker(out / s) for s in STAGES}


# ----------------------------------------------------------------------------- end to end
def test_every_stage_runs_and_records_its_results(done_run):
    out, res, lines = done_run
    assert res.ran == STAGES and res.skipped == []
    markers = _markers(out)
    for name, m in markers.items():
        assert m is not None and m["status"] == "complete" and m["wall_s"] > 0, name
        assert any(line.startswith("== [") and f"] {name}:" in line for line in lines), name  # one banner per stage
    # training stages: 4 -> 3 -> 2 by inheritance, steps as configured
    assert [markers[s]["results"]["steps"] for s in STAGES[:4]] == [2, 3, 2, 2]
    init3 = load_checkpoint(out / "supernet-3bit" / "init.pt")
    four = load_checkpoint(out / "supernet-4bit" / "final.pt")
    key = next(k for k in four.model if k.endswith(".step"))
    assert init3.bits == 3 and torch.allclose(init3.model[key], 2 * four.model[key])
    assert markers["supernet-4bit"]["results"]["checkpoint"] == "supernet-4bit/final.pt"
    # search: chosen subnets respect their budget, accuracies are percentages, extremes measured
    space = load_checkpoint(out / "supernet-2bit" / "final.pt").space
    for b in (4, 3, 2):
        r = markers[f"search-{b}bit"]["results"]
        assert {"largest", "smallest"} <= set(r["supernet"])
        for c in r["chosen"]:
            for metric, limit in c["budget"]["constraints"].items():
                assert c["costs"][metric] <= limit
            assert 0 <= c["holdout_top1"] <= 100 and 0 <= c["test_top1"] <= 100
            assert c["arch"]["bits"] == b
            # the chosen subnet is the best of every subnet measured at this bit-width that fits
            fitting = [float(row["accuracy"]) for row in csv.DictReader((out / f"search-{b}bit" / "evaluated.csv").open())
                       if all(float(row[m]) <= limit for m, limit in c["budget"]["constraints"].items())]
            assert c["holdout_top1"] == max(fitting)
    # the 2-bit search has the automatic budget at the baseline's BitOPs
    base = markers["baseline"]["results"]
    chosen2 = {c["budget"]["name"]: c for c in markers["search-2bit"]["results"]["chosen"]}
    assert chosen2["baseline"]["budget"]["constraints"]["bitops"] == pytest.approx(base["costs"]["bitops"])
    assert base["costs"]["bitops"] == cost.bitops(space, space.validate(Arch.from_dict(base["arch"])))
    # baseline: one network, as many training images as all OQAT training stages together
    seen = sum(markers[s]["results"]["images_seen"] for s in STAGES[:4])
    assert base["train"]["images_seen"] == pytest.approx(seen, abs=base["train"]["batch_size"])
    assert 0 <= base["test_top1"] <= 100
    # export: every distinct chosen subnet, both formats, verified, with latency
    rows = markers["export"]["results"]["exports"]
    assert len(rows) == sum(len(markers[f"search-{b}bit"]["results"]["chosen"]) for b in (4, 3, 2))
    for row in rows:
        for fmt in ("onnx", "oqat", "onnx-int"):
            f = row["files"][fmt]
            assert (out / f["path"]).is_file() and f["verified"] is True
        assert row["latency_ms_torch"] > 0 and row["latency_ms_onnx"] > 0
        d = row["deployment"]   # the deployment table: FP32 twin, QCDQ and integer files at batch 1 and 32
        ov = {"openvino-fp32", "openvino-qcdq"} if ovc.available() else set()   # and OpenVINO's where installed
        assert set(d["latency_ms"]) == {"fp32", "qcdq", "integer"} | ov and all(
            v["1"] > 0 and v["32"] > 0 for v in d["latency_ms"].values())
        # the QCDQ file was checked on OpenVINO and is scored on it, as `oqat predict` would run it
        assert row["files"]["onnx"]["engine"].startswith("OpenVINO" if ov else "onnxruntime"), row["files"]["onnx"]["notes"]
        assert row["files"]["onnx-int"]["engine"].startswith("onnxruntime")
        assert d["file_bytes"]["packed"] == row["files"]["oqat"]["size_bytes"] and d["isa"] and d["threads"] == 1


def test_each_exported_file_scores_what_its_report_row_says(done_run):
    """The files are the measured subnets: each one's own test top-1 (run as deployed) equals the
    search's figure for its subnet, which the report prints beside it."""
    from oqat.export import ExportedModel, read_onnx_info
    from oqat.measure import load_context

    out, _, _ = done_run
    export = read_marker(out / "export")["results"]
    s = _raw()["stages"]["search"]
    md = (out / "report.md").read_text()
    rows = [r for r in export["exports"] if not r.get("same_as")]
    assert rows
    for row in rows:
        ckpt = out / f"supernet-{row['bits']}bit" / "final.pt"
        test = load_context(ckpt, split="test", calib_images=s["calib_images"], calib_batch=s["calib_batch"],
                            eval_images=s["test_images"])
        for fmt, f in row["files"].items():
            scored = ExportedModel(out / f["path"]).top1(test.eval_data)
            assert scored["n"] == s["test_images"] == f["test_images"]
            assert scored["top1"] == pytest.approx(f["test_top1"])
            assert abs(f["test_top1"] - row["search_test_top1"]) <= 0.2, (fmt, row["budget"])
            assert abs(f["holdout_top1_file"] - f["holdout_top1_torch"]) <= 0.2
            line = next(x for x in md.splitlines() if f"[{Path(f['path']).name}]" in x and "passed" in x)
            assert f"| {f['test_top1']:.2f} | {row['search_test_top1']:.2f} |" in line
        info = read_onnx_info(out / row["files"]["onnx"]["path"])
        assert info["bn_calibration"] == {"recalibrated": True, "split": "holdout", "images": s["calib_images"],
                                          "batch": s["calib_batch"], "seed": 0, "data": "synthetic"}


def test_report_is_complete_and_self_contained(done_run):
    out, _, _ = done_run
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for section in ("Summary", "Stages and time", "Supernet accuracy per bit-width", "Pareto fronts",
                    "Chosen subnets", "Deployment", "Baseline comparison", "Configuration"):
        assert f"## {section}" in md and f"<h2>{section}</h2>" in page
    for img in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (out / img).is_file() and (out / img).stat().st_size > 1000
    assert "report_files/pareto_bitops.png" in md and "report_files/pareto_macs.png" in md
    links = re.findall(r"\]\((export/[^)]+)\)", md)
    assert any(link.endswith(".onnx") for link in links) and all((out / link).is_file() for link in links)
    # HTML: figures embedded, nothing fetched from elsewhere
    assert page.count('src="data:image/png;base64,') >= 2
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    # figures in the report match the markers
    m = read_marker(out / "search-4bit")["results"]
    assert f"{m['supernet']['largest']['test_top1']:.2f}" in md
    assert "Headline comparison" in md and f"{read_marker(out / 'baseline')['results']['test_top1']:.2f}" in md


def test_rerun_skips_every_stage(done_run, tmp_path):
    out, _, _ = done_run
    before = {s: m["finished"] for s, m in _markers(out).items()}
    res, lines = _run(out)
    assert res.ran == [] and res.skipped == STAGES
    assert {s: m["finished"] for s, m in _markers(out).items()} == before
    assert sum("skipped" in line for line in lines) == len(STAGES)


# ----------------------------------------------------------------------------- recovery
def test_killed_mid_training_resumes_to_the_same_result(done_run, tmp_path, monkeypatch):
    """Interrupt supernet-4bit after its first step (fp has 2 steps), then rerun the same command."""
    ref, _, _ = done_run
    out = tmp_path / "run"
    import oqat.training.distributed as D

    real, calls = D.average_gradients, {"n": 0}

    def boom(params):
        calls["n"] += 1
        if calls["n"] == 4:  # fp: steps 1, 2; supernet-4bit: step 1 done (checkpointed), interrupted in step 2
            raise KeyboardInterrupt
        return real(params)

    monkeypatch.setattr(D, "average_gradients", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(out)
    monkeypatch.setattr(D, "average_gradients", real)
    m = read_marker(out / "supernet-4bit")
    assert m["status"] == "running" and load_checkpoint(out / "supernet-4bit/checkpoints/last.pt").step == 1
    res, lines = _run(out)
    assert res.skipped == ["fp"] and res.ran == STAGES[1:]
    assert any("supernet-4bit" in line and "continuing" in line for line in lines)
    m = read_marker(out / "supernet-4bit")
    assert m["status"] == "complete" and m["results"]["resumed"] is True and m["attempts"] == 2
    a = load_checkpoint(out / "supernet-4bit/final.pt").model
    b = load_checkpoint(ref / "supernet-4bit/final.pt").model
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_marker(out / "search-2bit")["results"]["chosen"] == read_marker(ref / "search-2bit")["results"]["chosen"]


def test_deleted_marker_reruns_that_stage_and_what_depends_on_it(done_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done_run[0], out)
    (out / "search-2bit" / "stage.json").unlink()
    old = read_marker(out / "search-2bit" / ".." / "export")
    res, _ = _run(out)
    assert res.ran == ["search-2bit", "export"]
    new = read_marker(out / "search-2bit")["results"]
    assert new["measurements"] == 0 and new["cache_reused"] > 0  # every subnet came from the cache
    assert new["chosen"] == read_marker(done_run[0] / "search-2bit")["results"]["chosen"]
    assert read_marker(out / "export")["finished"] > old["finished"]


def test_changed_config_is_an_error_unless_redo_changed(done_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done_run[0], out)
    raw = _raw()
    raw["stages"]["search"]["population"] = 4
    with pytest.raises(StageMismatch, match=r"search-4bit.*search-3bit.*search-2bit.*export.*--redo-changed"):
        _run(out, raw)
    st = Pipeline(config_from_dict(raw), out).status()
    assert [s for s, v in st.items() if v == "changed"] == ["search-4bit", "search-3bit", "search-2bit", "export"]
    assert [s for s, v in st.items() if v == "done"] == STAGES[:4] + ["baseline"]
    # settings that do not change results (logging, device) keep every stage valid
    raw2 = _raw()
    raw2["train"]["log_every"] = 7
    assert set(Pipeline(config_from_dict(raw2), out).status().values()) == {"done"}
    res, _ = _run(out, raw, redo_changed=True)
    assert res.ran == ["search-4bit", "search-3bit", "search-2bit", "export"]
    assert read_marker(out / "search-4bit")["spec"]["population"] == 4


def test_finalists_are_re_measured_on_every_held_out_image_and_decide_the_choice(done_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(done_run[0], out)
    raw = _raw()
    raw["stages"]["search"].update(finalists=2, eval_images=24)  # finalists on all 48 held-out images
    raw["stages"]["export"]["enabled"] = False
    res, lines = _run(out, raw, redo_changed=True)
    assert res.ran == ["search-4bit", "search-3bit", "search-2bit"]
    holdout = raw["data"]["holdout"]
    assert any(f"re-measured on {holdout} held-out images" in line for line in lines)
    for b in (4, 3, 2):
        m = read_marker(out / f"search-{b}bit")
        r = m["results"]
        assert m["spec"]["finalists"] == 2 and r["finalists"] == 2 and r["final_images"] == holdout
        space = load_checkpoint(out / f"supernet-{b}bit" / "final.pt").space
        rows = list(csv.DictReader((out / f"search-{b}bit" / "evaluated.csv").open()))
        coarse = {space.key(Arch.from_dict(json.loads(row["arch"]))): float(row["accuracy"]) for row in rows}
        for c in r["chosen"]:
            best = json.loads((out / c["file"]).read_text())
            finalists = best["finalists"]
            # the first finalist is the best that fits by the search's own 24-image figures
            fitting = [float(row["accuracy"]) for row in rows
                       if all(float(row[m]) <= limit for m, limit in c["budget"]["constraints"].items())]
            assert 1 <= len(finalists) <= 2 and coarse[space.key(Arch.from_dict(finalists[0]["arch"]))] == max(fitting)
            assert c["holdout_top1"] == best["accuracy"] == max(f["accuracy"] for f in finalists)
            assert c["arch"] == best["arch"] == max(finalists, key=lambda f: f["accuracy"])["arch"]
            assert best["accuracy_source"]["finalists"] == 2 and best["accuracy_source"]["final_images"] == holdout
        # the largest and smallest are reported on the same images as the finalists
        fine = {space.key(Arch.from_dict(row["arch"])): row["accuracy"]
                for row in map(json.loads, (out / f"search-{b}bit" / "cache-finalists.jsonl").read_text().splitlines())}
        for k in ("largest", "smallest"):
            assert r["supernet"][k]["holdout_top1"] == fine[space.key(Arch.from_dict(r["supernet"][k]["arch"]))]
    md = (out / "report.md").read_text()
    assert "re-measured on" in md and "A star off the front is a finalist" in md
    # without finalists the spec is that of runs from before the option: every stage still done
    assert set(Pipeline(config_from_dict(_raw()), done_run[0]).status().values()) == {"done"}


def test_two_processes_redo_changed_stages(done_run, tmp_path):
    """--redo-changed with oqat's own two processes: rank 0 discards the changed stages with the
    markers both ranks read (reading them on rank 0 alone was a collective the other rank never
    joined, and the run hung before its first banner)."""
    out = tmp_path / "run"
    shutil.copytree(done_run[0], out)
    proc = run_oqat("run", CI, "--out", out, "--no-progress", "--procs", "2", "--redo-changed",
                    "--set", "stages.search.population=4", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "4 stage(s) run, 5 skipped" in proc.stdout
    assert read_marker(out / "search-4bit")["spec"]["population"] == 4
    assert read_marker(out / "search-4bit")["results"]["chosen"]


# ----------------------------------------------------------------------------- config errors
def _error(raw: dict) -> str:
    with pytest.raises(ValueError) as exc:
        config_from_dict(raw, "ci.yaml")
    return str(exc.value)


@pytest.mark.parametrize("edit, where", [
    (lambda r: r["stages"]["search"].update(populaton=3), r"ci\.yaml\.stages\.search: unknown key.*populaton"),
    (lambda r: r.update(stagez={}), r"ci\.yaml: unknown key.*stagez"),
    (lambda r: r["stages"]["supernet"].update(bits="four"), r"ci\.yaml\.stages\.supernet\.bits: expected an integer"),
    (lambda r: r["train"].update(lr="fast"), r"ci\.yaml\.train\.lr: expected a number"),
    (lambda r: r["stages"]["supernet"]["train"].update(momentun=0.9) if "train" in r["stages"]["supernet"]
     else r["stages"]["supernet"].update(train={"momentun": 0.9}), r"stages\.supernet\.train: unknown key.*momentun"),
    (lambda r: r["data"].update(holdout=-1), r"ci\.yaml\.data\.holdout"),
    (lambda r: r["stages"]["search"].update(budgets=["macs=1k"]),
     r"stages\.search\.budgets\[0\]: budget macs_1k is impossible at \d bit.*macs"),
    (lambda r: r["stages"]["search"].update(budgets=["x:macs=5G", {"name": "t", "bitops": 1000}]),
     r"stages\.search\.budgets\[1\]: budget t is impossible at \d bit: the smallest subnet already has bitops"),
    (lambda r: r["stages"]["search"].update(budgets=["flops=5M"]), r"stages\.search\.budgets\[0\]: metric 'flops'"),
    (lambda r: r["stages"]["inherit"]["targets"][0].update(bits=5), r"stages\.inherit\.targets\[0\]\.bits: 5 must be lower"),
    (lambda r: r["stages"]["inherit"]["targets"].reverse(), r"stages\.inherit\.targets\[1\]\.bits: 3 must be lower than 2"),
    (lambda r: r["stages"]["search"].update(bits=[4, 1]), r"stages\.search\.bits\[1\]: 1 bit is not trained"),
    (lambda r: r["stages"]["search"].update(finalists=-1), r"stages\.search\.finalists: must be an integer >= 0"),
    (lambda r: r["stages"]["search"].update(final_images=0), r"stages\.search\.final_images: must be >= 1"),
    (lambda r: r["stages"]["search"].update(finalists=2, final_images=40, eval_images=48),
     r"stages\.search\.final_images: 40 is not more than eval_images \(48\)"),
    (lambda r: r["stages"]["search"].update(finalists=2, eval_images=None),
     r"stages\.search\.final_images: the whole split is not more than eval_images \(the whole split\)"),
    (lambda r: r["stages"]["baseline"]["arch"].update(r=13), r"stages\.baseline\.arch: r: 13"),
    (lambda r: r["stages"]["baseline"].update(arch=None), r"stages\.baseline\.arch: required"),
    (lambda r: r["stages"]["export"].update(formats=["tflite"]), r"stages\.export\.formats\[0\]: 'tflite'"),
    (lambda r: r["stages"]["export"].update(onnx_weights="int2"), r"stages\.export\.onnx_weights: 'int2' is not one of"),
    (lambda r: r["stages"]["export"].update(float_weights="fp16"), r"stages\.export\.float_weights: 'fp16' is not one of"),
    (lambda r: r["stages"]["supernet"].update(max_steps=0), r"stages\.supernet\.train\.max_steps: must be >= 1"),
    (lambda r: r["stages"]["supernet"].update(train={"epochs": 2}),
     r"stages\.supernet\.epochs: given twice"),
    (lambda r: r["train"].update(batch_size=4096, ) or r["data"].update(train_limit=100),
     r"ci\.yaml\.train\.batch_size: 4096 exceeds data\.train_limit"),
    (lambda r: r["train"].update(arch={"ks": [3]}), r"ci\.yaml\.train\.arch: not allowed"),
])
def test_config_errors_name_the_key(edit, where):
    raw = _raw()
    edit(raw)
    assert re.search(where, _error(raw)), _error(raw)


def test_int4_export_on_an_onnxruntime_that_cannot_load_it_is_a_config_error(monkeypatch):
    import onnxruntime

    raw = _raw()
    raw["stages"]["export"].update(onnx_weights="int4", formats=["onnx"])
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.0")
    assert re.search(r"stages\.export\.onnx_weights: int4 weight storage: onnxruntime 1\.20\.0 cannot", _error(raw))


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    from oqat.cli import main

    rc = main(["run", str(CI), "--out", str(tmp_path / "x"), "--set", "stages.search.population=many"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "stages.search.population: expected an integer" in err and str(CI) in err
    assert not (tmp_path / "x").exists()


def test_dry_run_lists_stages_and_their_state(done_run, capsys):
    from oqat.cli import main

    assert main(["run", str(CI), "--out", str(done_run[0]), "--dry-run", "--set", "stages.export.verify_images=9"]) == 0
    text = capsys.readouterr().out
    states = dict(re.findall(r"\] (\S+)\s+(done|pending|changed|partial)", text))
    assert states == {**{s: "done" for s in STAGES}, "export": "changed"}


def test_report_only_rebuilds_the_report_from_the_run_folder_alone(done_run, tmp_path, capsys):
    """Copied elsewhere without checkpoints, data or config, the folder still yields its report."""
    from oqat.cli import main

    out = tmp_path / "moved"
    shutil.copytree(done_run[0], out, ignore=shutil.ignore_patterns("*.pt", "*.onnx", "*.oqat", "report*"))
    assert main(["run", "--report-only", "--out", str(out)]) == 0
    assert "report:" in capsys.readouterr().out
    new, old = (out / "report.md").read_text(), (done_run[0] / "report.md").read_text()
    strip = lambda t: re.sub(r"Run folder `[^`]*`|report written [0-9: -]+", "", t)  # noqa: E731
    assert strip(new) == strip(old) and (out / "report_files" / "pareto_bitops.png").is_file()
    assert main(["run", "--report-only", "--out", str(tmp_path / "nothing")]) == 2
    assert "run.json: not found" in capsys.readouterr().err


def test_percentage_budgets_interpolate_between_smallest_and_largest():
    cfg, _ = load_run_config(CI)
    space = run_space(cfg)
    lo, hi = cost.macs(space, space.smallest(2)), cost.macs(space, space.largest(2))
    b = Budget.parse("m:macs=25%,bitops=2G", where="x", space=space, bits=2)
    assert b.name == "m" and dict((c.metric, c.limit) for c in b.constraints) == {
        "macs": pytest.approx(lo + 0.25 * (hi - lo)), "bitops": 2e9}
    assert Budget.parse({"name": "s", "macs": "100%"}, where="x", space=space, bits=2).constraints[0].limit == pytest.approx(hi)
    with pytest.raises(ValueError, match="x: macs: '120%' must lie in 0%..100%"):
        Budget.parse("macs=120%", where="x", space=space, bits=2)


def test_shipped_configs_are_valid():
    """Every preset parses and validates (the ImageNet/CIFAR ones need no data for that)."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "stages" not in raw:  # a plain `oqat train` config
            assert load_train_config(path).train.epochs >= 1, path
            continue
        cfg, _ = load_run_config(path)
        pipe = Pipeline(cfg, "/nonexistent/run")
        assert [s.name for s in pipe.stages][:1] in (["fp"], [f"supernet-{cfg.stages.supernet.bits}bit"]), path


@pytest.mark.slow
def test_torchrun_two_processes_run_and_rerun(tmp_path):
    """Every rank takes the same decisions (markers come from rank 0); export and report on rank 0."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "oqat", "run", str(CI),
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    markers = _markers(out)
    assert all(m is not None and m["status"] == "complete" for m in markers.values())
    assert markers["supernet-4bit"]["results"]["world_size"] == 2
    assert (out / "report.html").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("), skipped") == len(STAGES) and "0 stage(s) run" in again.stdout


def test_export_stage_exports_a_network_once_whatever_its_unused_slots(done_run, tmp_path):
    """Two budgets chose the same network written with different unused slots (the 1-block
    stage's second ks/e entries): one set of files, the second row points at the first."""
    from oqat.pipeline.context import StageContext
    from oqat.pipeline.plan import plan_stages
    from oqat.pipeline.results import ChosenSubnet, SearchOutcome, SubnetScore
    from oqat.pipeline.stages import export
    from oqat.training.distributed import DistInfo

    ref, _, _ = done_run
    cfg, _ = load_run_config(CI)
    space = run_space(cfg)
    stage = next(s for s in plan_stages(cfg, space, DataConfig.from_dict(cfg.data)) if s.kind == "export")
    stage.inputs = ["search-4bit"]
    stage.plan.latency = False
    a = Arch(ks=[3, 5, 5, 3], e=[2, 3, 3, 2], d=[1, 2], r=16, bits=4)   # slot 1 unused (stage 1 has depth 1)
    b = a.replace(ks=(3, 3, 5, 3), e=(2, 2, 3, 2))
    assert a != b and space.key(a) == space.key(b)
    score = SubnetScore(a.to_dict(), 50.0, 50.0, cost.summary(space, a))
    chosen = [ChosenSubnet(x.to_dict(), 50.0, 50.0, cost.summary(space, x), budget={"name": n, "constraints": {}},
                           file=f"search-4bit/best_{n}.json") for n, x in (("first", a), ("second", b))]
    out = tmp_path / "run"
    (out / "supernet-4bit").mkdir(parents=True)
    shutil.copy(ref / "supernet-4bit" / "final.pt", out / "supernet-4bit" / "final.pt")
    searched = SearchOutcome(4, "supernet-4bit/final.pt", {"largest": score, "smallest": score}, chosen, 2, 2, 0,
                             None, 32, 48, 48, "search-4bit/evaluated.csv")
    ctx = StageContext(out, cfg, space, DataConfig.from_dict(cfg.data), torch.device("cpu"), DistInfo(),
                       echo=lambda _: None, progress=False, outcomes={"search-4bit": searched})
    rows = export.run(ctx, stage, out / "export", False).exports
    assert [r.budget for r in rows] == ["first", "second"] and rows[1].same_as == "first"
    assert rows[1].files == rows[0].files
    assert sorted(p.name for p in (out / "export").iterdir()) == ["4bit-first.int.onnx", "4bit-first.onnx", "4bit-first.oqat"]
