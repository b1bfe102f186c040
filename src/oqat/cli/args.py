"""Arguments shared by several verbs: the search space and a subnet (OQA-style flags or JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..space import Arch, SearchSpace, parse_int_list


def add_space_args(parser: argparse.ArgumentParser, default: str | None = "mbv3-imagenet") -> None:
    parser.add_argument("--space", default=default,
                        help=f"search-space preset ({', '.join(SearchSpace.preset_names())}) or a YAML file")
    parser.add_argument("--num-classes", type=int, default=None, help="override the space's number of classes")


def space_from_args(args: argparse.Namespace) -> SearchSpace:
    name = args.space
    space = SearchSpace.from_yaml(name) if Path(name).suffix in (".yaml", ".yml") else SearchSpace.preset(name)
    if getattr(args, "num_classes", None):
        space = space.replace(num_classes=args.num_classes)
    return space


def add_procs_arg(parser: argparse.ArgumentParser, default: str) -> None:
    """``--procs``: how many CPU processes split the run (oqat.training.launch)."""
    parser.add_argument("--procs", default=None, metavar="N|auto",
                        help=f"CPU processes splitting the configured batch (default: {default}; 'auto': one "
                             f"single-threaded process per core, which keeps its speed when another program takes "
                             f"a core; 1: one process with torch's threads; OQAT_PROCS overrides the default)")


def add_arch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("subnet (either --arch FILE or the OQA-style flags)")
    g.add_argument("--arch", help="JSON file with ks/e/d/r/bits (search output files work too)")
    g.add_argument("--ks", help="kernel size per block slot, e.g. 3,5,7,...")
    g.add_argument("--expand", help="expand ratio per block slot, e.g. 3,4,6,...")
    g.add_argument("--depth", help="depth per stage, e.g. 2,3,4,4,2")
    g.add_argument("--resolution", type=int, help="input resolution")
    g.add_argument("--bits", type=int, help="bit-width (2..8, 32 = full precision)")
    g.add_argument("--largest", action="store_true", help="the largest subnet of the space")
    g.add_argument("--smallest", action="store_true", help="the smallest subnet of the space")


def arch_from_args(args: argparse.Namespace, space: SearchSpace, default_bits: int | None = None) -> Arch:
    """Build and validate the subnet named on the command line (errors name the flag)."""
    bits = args.bits if args.bits is not None else default_bits
    flags = [args.ks, args.expand, args.depth]
    chosen = sum([bool(args.arch), any(f is not None for f in flags), args.largest, args.smallest])
    if chosen != 1:
        raise ValueError("give exactly one of --arch FILE, the flags --ks/--expand/--depth, --largest or --smallest")
    if args.arch:
        arch = Arch.load(args.arch)
        changes = {k: v for k, v in (("bits", args.bits), ("r", args.resolution)) if v is not None}
        arch = arch.replace(**changes) if changes else arch
    elif args.largest or args.smallest:
        arch = (space.largest if args.largest else space.smallest)(bits if bits is not None else 32)
        if args.resolution is not None:
            arch = arch.replace(r=args.resolution)
    else:
        if None in flags or args.resolution is None:
            raise ValueError("--ks, --expand, --depth and --resolution are all required with the flag form")
        arch = Arch(ks=parse_int_list(args.ks, "ks"), e=parse_int_list(args.expand, "expand"),
                    d=parse_int_list(args.depth, "depth"), r=args.resolution, bits=bits if bits is not None else 32)
    try:
        space.validate(arch)
    except ValueError as exc:  # name where the subnet came from: the file, or the flags
        source = args.arch or ("--largest" if args.largest else "--smallest" if args.smallest
                               else "--ks/--expand/--depth/--resolution")
        raise ValueError(f"{source}: {exc} (space {space.name})") from None
    return arch
