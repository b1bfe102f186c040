"""``oqat convert``: the published OFA / OQA supernets into oqat checkpoints, and back.

    oqat convert ofa_mbv3_d234_e346_k357_w1.0 -o ofa-w1.0.pt          # OFA, full precision
    oqat convert oqa_mbv3_d234_e346_k357_w1.0_b4 -o oqa-b4.pt         # OQA, 4 bit (from the name)
    oqat convert runs/x/fp/final.pt --to ofa -o ofa_mbv3_mine.pth     # oqat -> OFA's layout
"""

from __future__ import annotations

from pathlib import Path

from ...interop import convert_file, export_file
from ...interop.convert import SOURCES, TARGETS
from ...space import SearchSpace
from ...utils.files import ensure_output_file


def register(sub) -> None:
    p = sub.add_parser("convert", help="import a published OFA/OQA supernet (or export an oqat one to their layout)")
    p.add_argument("src", help="OFA/OQA supernet file (a state dict, possibly under 'state_dict'), or with --to "
                               "an oqat checkpoint")
    p.add_argument("-o", "--out", required=True, help="output file")
    p.add_argument("--from", dest="source", default="auto", choices=SOURCES,
                   help="layout of SRC: ofa (full precision), oqa (LSQ steps sa/sw), auto (by the step keys)")
    p.add_argument("--to", default=None, choices=TARGETS,
                   help="export an oqat checkpoint instead: ofa (full precision) or oqa (quantized, unsigned)")
    p.add_argument("--bits", type=int, default=None,
                   help="bit-width of an OQA file (default: from its name, ..._b4 -> 4)")
    p.add_argument("--space", default=None,
                   help="space the file must fit (preset or YAML; default: mbv3-imagenet or mbv3-imagenet-w1.2, "
                        "whichever fits)")
    p.set_defaults(func=run)


def run(args) -> int:
    ensure_output_file(args.out, "-o/--out")
    if args.to is not None:
        if args.bits is not None or args.space is not None or args.source != "auto":
            raise ValueError("--to exports an oqat checkpoint as it is; --bits, --space and --from do not apply")
        done = export_file(args.src, args.out, to=args.to)
        print(f"wrote {done.out}: {done.space} supernet in {done.layout.upper()}'s layout ({done.tensors} tensors, "
              "under 'state_dict')")
        return 0
    space = None
    if args.space is not None:
        space = SearchSpace.resolve(args.space, base_dir=Path.cwd())
    done = convert_file(args.src, args.out, source=args.source, bits=args.bits, space=space)
    print(f"wrote {done.describe()}")
    print(f"next: oqat eval --ckpt {done.out} --data-root IMAGENET --split test --largest (README, "
          "\"Start from the published supernets\")")
    return 0
