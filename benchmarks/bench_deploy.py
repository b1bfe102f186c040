#!/usr/bin/env python
"""The deployment table: FP32 / QCDQ / integer ONNX of one subnet, sizes, resident weights and
latency (onnxruntime CPU, 1 thread by default), plus OpenVINO CPU as a second engine.

(a) the OQA README ``mbv3-imagenet`` 4-bit subnet at 224 px and its 2-bit twin: random weights
(steps initialised by one forward, BN calibrated on random inputs; speed does not depend on the
weights); (b) with ``--ckpt`` (repeatable), a subnet of a trained checkpoint (e.g. Fashion-MNIST):
exported through ``deployable_from_checkpoint`` + ``export_subnet`` (BN re-calibrated, verified on
held-out images) in both integer modes and as QCDQ, the QCDQ file also with int4 weight containers
and int8 classifier / squeeze-excite weights (``QCDQ_VARIANTS``), each with its verification figures
and the OpenVINO check.

    python benchmarks/bench_deploy.py                                  # (a), 1 thread
    python benchmarks/bench_deploy.py --edge-bits none,8               # (a), float and 8-bit stem/classifier
    python benchmarks/bench_deploy.py --skip-imagenet --ckpt runs/fm/final.pt --arch best.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_export import OQA_README, fresh_subnet  # noqa: E402

from oqat import Arch, SearchSpace  # noqa: E402
from oqat.export import deployable_from_checkpoint, export_subnet  # noqa: E402
from oqat.export.deployment import DeploymentFiles, deployment_row, fp32_reference  # noqa: E402
from oqat.export.meta import model_info, preprocessing_for  # noqa: E402
from oqat.export.onnx import export_onnx  # noqa: E402
from oqat.export.onnx_int import build_onnx_int  # noqa: E402
from oqat.export.packed import save_packed  # noqa: E402
from oqat.utils.devices import threads as set_threads  # noqa: E402

# QCDQ files besides the default (int8 codes, float SE and classifier): smaller containers and
# int8 full-precision weights, each also timed on OpenVINO
QCDQ_VARIANTS = {"int4": {"weights": "int4"},
                 "int4-int8cls": {"weights": "int4", "float_weights": "int8-classifier"},
                 "int8fp": {"weights": "int8", "float_weights": "int8"}}
# the files part (b) exports through export_subnet and verifies: (label, format, keyword arguments)
CHECKED = [(f"integer {mode}{'+int8' if fw == 'int8' else ''}", "onnx-int", {"int_mode": mode, "float_weights": fw})
           for fw in ("float", "int8") for mode in ("exact", "fast")] + \
          [("qcdq", "onnx", {}), *[(f"qcdq-{name}", "onnx", kw) for name, kw in QCDQ_VARIANTS.items()]]


def write_files(sub, folder: Path, tag: str) -> DeploymentFiles:
    import onnx

    info = model_info(sub, preprocessing_for(sub.space, sub.arch.r, None)[0])
    fp32 = export_onnx(fp32_reference(sub), folder / f"{tag}-fp32.onnx")
    qcdq = export_onnx(sub, folder / f"{tag}-qcdq.onnx", weights="int8")
    variants = {f"qcdq-{name}": export_onnx(sub, folder / f"{tag}-qcdq-{name}.onnx", **kw) for name, kw in QCDQ_VARIANTS.items()}
    paths = {}
    for mode, fw in (("exact", "float"), ("fast", "float"), ("exact", "int8"), ("fast", "int8")):
        model, _, _ = build_onnx_int(sub, info=info, mode=mode, float_weights=fw)
        paths[(mode, fw)] = folder / f"{tag}-int-{mode}-{fw}.onnx"
        onnx.save_model(model, str(paths[(mode, fw)]))
    packed = save_packed(sub, folder / f"{tag}.oqat", info)
    return DeploymentFiles(fp32=fp32, qcdq=qcdq, integer=paths[("exact", "float")], packed=packed,
                           extra={**variants, "integer-fast": paths[("fast", "float")], "integer-int8fp": paths[("exact", "int8")],
                                  "integer-fast-int8fp": paths[("fast", "int8")]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--bits", default="4,2")
    p.add_argument("--edge-bits", default="none",
                   help="(a) for each of these stem/classifier widths (none = float as OQA, or 2..8), e.g. none,8")
    p.add_argument("--skip-imagenet", action="store_true")
    p.add_argument("--ckpt", action="append", default=[], help="trained checkpoint(s) for part (b)")
    p.add_argument("--arch", help="arch JSON for --ckpt (default: the space's smallest at the checkpoint's bits)")
    p.add_argument("--verify-images", type=int, default=500)
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()
    with set_threads(args.threads), torch.no_grad():
        run(args)


def run(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_imagenet:
            for edge in args.edge_bits.split(","):
                edge_bits = None if edge == "none" else int(edge)
                space = SearchSpace.preset("mbv3-imagenet").replace(edge_bits=edge_bits)
                what = "" if edge_bits is None else f", stem and classifier at {edge_bits} bit"
                for bits in [int(b) for b in args.bits.split(",")]:
                    arch = Arch(**{**OQA_README, "r": args.resolution}, bits=bits)
                    sub, _, _ = fresh_subnet(space, arch, 0)
                    files = write_files(sub, folder, f"oqa{bits}-{edge}")
                    row = deployment_row(files, subnet=f"mbv3-imagenet OQA README subnet (random weights{what})",
                                         bits=bits, resolution=arch.r, threads=args.threads, runs=args.runs)
                    print(row.table() + "\n", flush=True)
                    rows.append({**row.to_dict(), "edge_bits": edge_bits})
        for ckpt in args.ckpt:
            from oqat.models import load_checkpoint

            header = load_checkpoint(ckpt)
            arch = (Arch.from_dict(json.loads(Path(args.arch).read_text()).get("arch", json.loads(Path(args.arch).read_text())))
                    if args.arch else header.space.smallest(header.bits))
            arch = arch.replace(bits=header.bits)
            dep = deployable_from_checkpoint(ckpt, arch, verify_images=args.verify_images)
            reports, ov = {}, {}
            for i, (label, fmt, kw) in enumerate(CHECKED):
                kw = {"weights": "int8", **kw}
                try:
                    res = export_subnet(dep.sub, folder / f"ck-{i}.onnx", fmt, config=dep.ckpt.config,
                                        verification=dep.verification, calibration=dep.calibration, progress=False,
                                        **kw)
                    rep = res.report
                    if res.info.get("openvino"):   # export_subnet checks a QCDQ file on OpenVINO where installed
                        ov[label] = res.info["openvino"]
                except Exception as exc:           # VerificationError keeps the report
                    rep = getattr(exc, "report", None)
                    print(f"{label}: {exc}")
                print(f"--- {ckpt} ({header.bits}-bit), {label}:")
                print(rep.summary() if rep else "no report")
                if label in ov:
                    print(f"OpenVINO on this file: {ov[label]}")
                reports[label] = rep.to_dict() if rep else None
            files = write_files(dep.sub, folder, "ck")
            row = deployment_row(files, subnet=f"{header.space.name} {arch.to_json()}", bits=header.bits,
                                 resolution=arch.r, in_channels=header.space.in_channels, threads=args.threads,
                                 runs=args.runs)
            print(row.table() + "\n", flush=True)
            rows.append({**row.to_dict(), "verification": reports, "openvino": ov})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
