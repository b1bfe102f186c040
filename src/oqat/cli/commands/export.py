"""``oqat export``: a subnet of a trained supernet as verified ONNX (QCDQ) or packed low-bit weights."""

from __future__ import annotations

import json

from ...measure import DEFAULT_CALIB_BATCH, DEFAULT_CALIB_IMAGES
from ...utils.files import ensure_output_file
from ..args import add_arch_args, arch_from_args

_CALIB_KEYS = {"calib_images": DEFAULT_CALIB_IMAGES, "calib_batch": DEFAULT_CALIB_BATCH, "calib_seed": 0}


def register(sub) -> None:
    p = sub.add_parser("export", help="export a subnet to ONNX (QCDQ) or packed low-bit weights, verified",
                       description="Extract a subnet from a checkpoint and write it as ONNX (every quantized tensor "
                                   "as QuantizeLinear -> Clip -> DequantizeLinear) or as packed b-bit weight codes "
                                   "(.oqat, safetensors), then check the file against PyTorch. Exits non-zero when "
                                   "verification fails. See docs/export.md.")
    p.add_argument("--ckpt", required=True, help="supernet checkpoint (its space and bits are used)")
    add_arch_args(p)
    p.add_argument("--format", choices=("onnx", "oqat", "onnx-int"), default="onnx",
                   help="onnx (QCDQ, default), oqat (packed) or onnx-int (integer kernels: QLinearConv/ConvInteger)")
    p.add_argument("--int-mode", choices=("exact", "fast"), default="exact",
                   help="onnx-int: exact (float epilogue after ConvInteger where h_swish, squeeze-excite or a "
                        "residual follows; default) or fast (QLinearConv everywhere, one extra 8-bit rounding)")
    p.add_argument("--float-weights", "--int-float-weights", dest="float_weights",
                   choices=("float", "int8", "int8-classifier"), default="float",
                   help="onnx, onnx-int: the full-precision layers' weights (squeeze-excite, a float classifier) as "
                        "float32 (default: the trained network exactly), int8 per output channel (about 2.3x smaller "
                        "files on mbv3-imagenet), or int8 for the classifier only (squeeze-excite is the sensitive "
                        "part); verified like the rest")
    p.add_argument("-o", "--output", required=True, help="output file (e.g. model.onnx or model.oqat)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 21 with --onnx-weights int4)")
    p.add_argument("--onnx-weights", choices=("float", "int8", "int4"), default="int8",
                   help="int8 (default): the integer codes stored as int8 followed by DequantizeLinear (4x smaller; "
                        "OpenVINO runs the convs on integer kernels); int4: codes of 4 bits or fewer two per byte "
                        "(opset 21, onnxruntime >= 1.23; the same logits and kernels); float: weights stored as float32 and quantized "
                        "in the graph (the same logits)")
    p.add_argument("--verify-images", type=int, default=256, help="inputs used for verification (default 256)")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--batch-size", type=int, default=32, help="verification batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification subset / random inputs")
    g = p.add_argument_group("BN re-calibration (as the measurement that chose the subnet)")
    g.add_argument("--calib-images", type=int, default=None,
                   help=f"held-out images to re-estimate BN statistics on (default: the arch file's measurement "
                        f"settings, else {DEFAULT_CALIB_IMAGES})")
    g.add_argument("--calib-batch", type=int, default=None,
                   help=f"re-calibration batch size (default: the arch file's, else {DEFAULT_CALIB_BATCH})")
    g.add_argument("--calib-seed", type=int, default=None, help="seed of the calibration subset (default: the arch "
                                                               "file's, else 0)")
    g.add_argument("--data", default=None, help="dataset name, overriding the checkpoint's config")
    g.add_argument("--data-root", default=None, help="dataset folder, overriding the checkpoint's config")
    g.add_argument("--no-data", action="store_true",
                   help="read no data (verification on random inputs); needs --no-recalibrate")
    g.add_argument("--no-recalibrate", action="store_true",
                   help="export with the supernet's running BN statistics, which belong to no subnet (the "
                        "file is then NOT the measured model; its metadata says so)")
    p.add_argument("--accuracy", type=float, help="accuracy to store in the metadata (else read from the arch file)")
    p.add_argument("--class-names", help="class names to store: a JSON list or a text file with one per line")
    p.add_argument("--table", action="store_true", help="print the per-tensor code comparison")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def _arch(args, record: dict, space, ckpt_bits: int):
    """The arch from the flags; an arch file without "bits" takes the checkpoint's."""
    arch = arch_from_args(args, space, default_bits=ckpt_bits)
    inner = record.get("arch", record)
    if args.arch and args.bits is None and isinstance(inner, dict) and "bits" not in inner:
        arch = arch.replace(bits=ckpt_bits)
    return arch


def _measurement(record: dict) -> dict:
    """The BN re-calibration settings under which a search or eval output file was measured."""
    source = record.get("accuracy_source")
    if not isinstance(source, dict) or source.get("source") != "direct":
        return {}
    return {k: v for k, v in source.items() if k in _CALIB_KEYS and isinstance(v, int) and not isinstance(v, bool)}


def calibration_settings(args, record: dict) -> tuple[dict, str]:
    """(calib_images/calib_batch/calib_seed, where they came from): flags, else the arch file, else defaults."""
    measured = _measurement(record)
    out = {}
    for key, default in _CALIB_KEYS.items():
        flag = getattr(args, key)
        if flag is not None:
            if flag < (0 if key == "calib_seed" else 1):
                raise ValueError(f"--{key.replace('_', '-')}: expected a positive integer, got {flag}")
            out[key] = flag
        else:
            out[key] = measured.get(key, default)
    origin = f"the settings {args.arch} was measured with" if measured else "the defaults"
    if any(getattr(args, k) is not None for k in _CALIB_KEYS):
        origin = "the command line" + (f" and {origin}" if measured else "")
    return out, origin


def run(args) -> int:
    from ...export import deployable_from_checkpoint, export_subnet
    from ...export.deploy import read_class_names
    from ...export.meta import stored_accuracy
    from ...export.verify import VerificationError
    from ...models import load_checkpoint
    from ...utils.config import load_json

    ensure_output_file(args.output, "-o/--output")
    if args.format == "oqat" and args.float_weights != "float":
        raise ValueError("--float-weights: the packed format stores the full-precision weights as trained; "
                         "int8 applies to --format onnx and onnx-int")
    if args.verify_images < 1:
        raise ValueError(f"--verify-images: expected a positive integer, got {args.verify_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    header = load_checkpoint(args.ckpt)                      # cheap validation before building anything
    record = load_json(args.arch, "arch file") if args.arch else {}
    record = record if isinstance(record, dict) else {}
    arch = _arch(args, record, header.space, header.bits)
    accuracy = args.accuracy if args.accuracy is not None else stored_accuracy(record)
    names = read_class_names(args.class_names) if args.class_names else None
    settings, origin = calibration_settings(args, record)
    dep = deployable_from_checkpoint(args.ckpt, arch, **settings, verify_images=args.verify_images,
                                     verify_seed=args.seed, data=args.data, data_root=args.data_root,
                                     use_data=not args.no_data, recalibrate=not args.no_recalibrate)
    ckpt = dep.ckpt
    c = dep.calibration
    source = {"checkpoint": str(args.ckpt), "step": ckpt.step, "epoch": ckpt.epoch}
    try:
        result = export_subnet(dep.sub, args.output, args.format, config=ckpt.config, verify=not args.no_verify,
                               verify_images=args.verify_images, seed=args.seed, batch_size=args.batch_size,
                               accuracy=accuracy, class_names=names, source=source, opset=args.opset,
                               weights=args.onnx_weights, verification=dep.verification, calibration=c,
                               int_mode=args.int_mode, float_weights=args.float_weights)
    except VerificationError as exc:
        if exc.report is not None:
            if args.table:
                print(exc.report.table())
            print(exc.report.summary())
        raise
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if c["recalibrated"]:
        print(f"BN statistics re-calibrated on {c['images']} held-out images of {c['data']} (batch {c['batch']}, "
              f"seed {c['seed']}; {origin})")
    print(f"wrote {result.path} ({result.format}, {result.size / 1024:.1f} KiB): {ckpt.space.name}, "
          f"{arch.bits if arch.quantized else 'full-precision'}{'-bit' if arch.quantized else ''}, arch {arch.to_json()}")
    for note in result.notes:
        print(f"note: {note}")
    if result.report is not None:
        if args.table:
            print(result.report.table())
        print(result.report.summary())
    else:
        print("verification skipped (--no-verify)")
    ov = result.info.get("openvino")
    if ov and ov.get("verified"):
        print(f"OpenVINO {ov['version']}: PASSED ({ov['integer_convs']} of {ov['quantized_convs']} quantized convs on "
              f"integer kernels, top-1 agreement {100 * ov['top1_agreement']:.2f}%); `oqat predict` runs it there")
    return 0
