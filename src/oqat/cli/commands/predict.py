"""``oqat predict``: class and probability of image files with an exported model."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with an exported model (.onnx or .oqat)",
                       description="Runs an ONNX model (onnxruntime, CPU) or a packed .oqat model on image files, "
                                   "with the preprocessing stored in the model's metadata.")
    p.add_argument("model", help="model written by `oqat export` (.onnx or .oqat)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--top", type=int, default=1, help="also list the top-K classes (default 1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--engine", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="what runs an ONNX file: auto (default) takes OpenVINO for a QCDQ file that OpenVINO "
                        "verified at export, when it is installed (integer kernels; onnxruntime runs that file "
                        "in float), else onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: the engine's choice)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per image)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...export.predict import ExportedModel, format_prediction, predict_files

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
    model = ExportedModel(args.model, threads=args.threads, engine=args.engine)
    preds = predict_files(model, args.images, top_k=args.top, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    else:
        for p in preds:
            print(format_prediction(p))
    return 0
