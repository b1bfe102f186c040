"""``oqat inherit CKPT --bits B``: the starting checkpoint of a lower-bit supernet."""

from __future__ import annotations

from pathlib import Path

from ...training import DEFAULT_FACTOR, inherit_checkpoint
from ...utils.files import ensure_output_file


def register(sub) -> None:
    p = sub.add_parser("inherit", help="bit inheritance: b-bit checkpoint -> starting point of a lower-bit one")
    p.add_argument("ckpt", help="checkpoint of the higher-bit supernet")
    p.add_argument("--bits", type=int, required=True, help="target bit-width (lower than the checkpoint's)")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                   help=f"step-size multiplier per bit removed (default {DEFAULT_FACTOR:g})")
    p.add_argument("-o", "--out", help="output file (default: next to CKPT, named inherit-<bits>bit.pt)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = ensure_output_file(Path(args.out) if args.out else Path(args.ckpt).with_name(f"inherit-{args.bits}bit.pt"),
                             "-o/--out")
    path = inherit_checkpoint(args.ckpt, args.bits, out, args.factor)
    print(f"wrote {path}; continue with: oqat train CONFIG --bits {args.bits} --init {path} --out RUN")
    return 0
