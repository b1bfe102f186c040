"""The export stage: every distinct chosen subnet as verified files, each the subnet as the
search measured it (BN re-calibrated on the same held-out images, batch and seed), then scored
on its own on the search's test images, as deployed; optionally timed."""

from __future__ import annotations

from pathlib import Path

import torch

from ...export import ExportedModel, VerificationError, export_subnet
from ...export.deploy import context_verification, unverified_path
from ...export.deployment import DeploymentFiles, deployment_row, fp32_reference
from ...export.onnx import export_onnx
from ...measure import load_context
from ...measure.latency import time_module
from ...space import Arch
from ...utils.devices import threads
from ..context import StageContext
from ..plan import Stage
from ..results import ExportedFile, ExportOutcome, ExportRow

SUFFIX = {"onnx": "onnx", "oqat": "oqat", "onnx-int": "int.onnx"}


def run(ctx: StageContext, stage: Stage, folder: Path, resumed: bool) -> ExportOutcome:
    e, s = stage.plan, ctx.cfg.stages.search
    folder.mkdir(parents=True, exist_ok=True)
    done: dict[str, ExportRow] = {}
    rows: list[ExportRow] = []
    for name in stage.inputs:
        searched = ctx.outcomes[name]
        ckpt = ctx.out / searched.checkpoint
        measured = load_context(ckpt, split="holdout", calib_images=s.calib_images, calib_batch=s.calib_batch,
                                calib_seed=s.seed, eval_images=e.verify_images, device="cpu")
        test = measured.with_split("test", s.test_images)
        for c in searched.chosen:
            arch = Arch.from_dict(c.arch)
            key = measured.space.key(arch)
            budget = c.budget["name"]
            if key in done:
                first = done[key]
                rows.append(ExportRow(arch.bits, budget, arch.to_dict(), c.test_top1, first.files,
                                      first.latency_ms_torch, first.latency_ms_onnx, first.deployment,
                                      first.first_budget, same_as=first.first_budget))
                continue
            sub = measured.deployable(arch)
            verification = context_verification(measured, arch)
            files = {}
            for fmt in e.formats:
                path = folder / f"{arch.bits}bit-{budget}.{SUFFIX[fmt]}"
                try:
                    r = export_subnet(sub, path, fmt, config=measured.ckpt.config, verification=verification,
                                      calibration=measured.calibration(), accuracy=c.test_top1,
                                      source={"checkpoint": str(ckpt), "step": measured.ckpt.step, "run": str(ctx.out)},
                                      opset=e.opset, weights=e.onnx_weights, float_weights=e.float_weights,
                                      progress=False)
                except VerificationError as exc:
                    # Recorded and reported, not fatal: the other subnets and the report still come.
                    bad = unverified_path(path)
                    rep = exc.report
                    files[fmt] = ExportedFile(ctx.relative(bad), bad.stat().st_size if bad.is_file() else 0, False,
                                              rep.summary() if rep is not None else str(exc),
                                              rep.top1_agreement if rep is not None else None)
                    ctx.echo(f"   WARNING: {exc}")
                    continue
                deployed = ExportedModel(path)
                scored = deployed.top1(test.eval_data)
                rep = r.report
                files[fmt] = ExportedFile(ctx.relative(path), r.size, rep.ok, rep.summary(), rep.top1_agreement,
                                          rep.exported_top1, rep.reference_top1, scored["top1"], scored["n"], r.notes,
                                          deployed.engine)
                ctx.echo(f"   wrote {ctx.relative(path)} ({r.size / 1024:.1f} KiB), verification passed; the file's "
                         f"test top-1 {scored['top1']:.2f}% on {deployed.engine} (search: {c.test_top1:.2f}%)")
            row = ExportRow(arch.bits, budget, arch.to_dict(), c.test_top1, files, first_budget=budget)
            if e.latency:
                row.latency_ms_torch, row.deployment = latency(ctx, sub, arch, files, folder / f"{arch.bits}bit-{budget}",
                                                               e.latency_runs)
                row.latency_ms_onnx = ((row.deployment or {}).get("latency_ms", {}).get("qcdq") or {}).get("1")
            done[key] = row
            rows.append(row)
        del measured, test
    return ExportOutcome(rows, s.calib_images, s.calib_batch, s.seed)


def latency(ctx: StageContext, sub, arch: Arch, files: dict[str, ExportedFile], base: Path,
            runs: int) -> tuple[float, dict | None]:
    """(PyTorch ms at batch 1 on one thread's CPU clock, the deployment row of the verified ONNX files).

    The deployment row times the FP32 twin of the subnet (written beside the files as
    ``<name>.fp32.onnx``), the QCDQ and the integer file interleaved at batch 1 and 32 on one
    onnxruntime thread (:func:`oqat.export.deployment.deployment_row`).
    """
    x = torch.randn(1, sub.space.in_channels, arch.r, arch.r)
    with threads(1):
        torch_ms = time_module(sub.cpu().eval(), x, warmup=3, repeats=runs, clock="cpu")
    ok = {fmt: ctx.out / f.path for fmt, f in files.items() if f.verified}
    if not {"onnx", "onnx-int"} & set(ok):
        return torch_ms, None
    fp32 = base.with_name(base.name + ".fp32.onnx")
    export_onnx(fp32_reference(sub), fp32)
    row = deployment_row(DeploymentFiles(fp32=fp32, qcdq=ok.get("onnx"), integer=ok.get("onnx-int"), packed=ok.get("oqat")),
                         subnet=base.name, bits=arch.bits, resolution=arch.r, in_channels=sub.space.in_channels,
                         threads=1, runs=runs)
    return torch_ms, row.to_dict()


__all__ = ["run"]
