"""``oqat cost``: MACs, params, BitOPs, OQA-FLOPs and size of one subnet, analytically."""

from __future__ import annotations

import json

from ...space import cost
from ..args import add_arch_args, add_space_args, arch_from_args, space_from_args


def register(sub) -> None:
    p = sub.add_parser("cost", help="analytic cost of a subnet (MACs, params, BitOPs, OQA-FLOPs, size)")
    add_space_args(p)
    add_arch_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--layers", action="store_true", help="also list every layer's MACs")
    p.set_defaults(func=run)


def run(args) -> int:
    space = space_from_args(args)
    arch = arch_from_args(args, space)
    summary = cost.summary(space, arch)
    if args.json:
        out = {"space": space.name, "arch": arch.to_dict(), **summary}
        if args.layers:
            out["layers"] = [vars(layer) for layer in cost.layers(space, arch)]
        print(json.dumps(out, indent=2))
        return 0
    print(f"space {space.name}, arch {arch.to_json()}")
    print(cost.format_summary(summary))
    if args.layers:
        for layer in cost.layers(space, arch):
            q = (f"q{layer.fixed_bits}" if layer.fixed_bits else "q") if layer.quantized else "fp"
            print(f"  {layer.name:28s} {layer.macs / 1e6:9.3f} MMACs  {q}")
    return 0
