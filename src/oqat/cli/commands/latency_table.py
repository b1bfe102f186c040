"""``oqat latency-table``: measure per-block latency on this device and check its predictions."""

from __future__ import annotations

from ..args import add_space_args, space_from_args


def register(sub) -> None:
    p = sub.add_parser("latency-table", help="build a per-block latency lookup table on this device")
    add_space_args(p, default="mbv3-tiny")
    p.add_argument("--ckpt", default=None, help="take space and bits (and weights) from a checkpoint")
    p.add_argument("--bits", type=int, default=4, help="bit-width of the fake-quantized model (without --ckpt)")
    p.add_argument("--out", default="runs/latency.json", help="table file (JSON)")
    p.add_argument("--resolutions", default=None, help="comma-separated subset of the space's resolutions")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (fixed while timing)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed runs per entry (the median is kept)")
    p.add_argument("--stat", default="median", choices=("min", "median"),
                   help="statistic over the timed repeats (min resists preemption with --clock wall)")
    p.add_argument("--clock", default="auto", choices=("auto", "cpu", "wall"),
                   help="auto: the thread's CPU time with one CPU thread (ignores preemption), else wall time")
    p.add_argument("--device", default="cpu")
    p.add_argument("--check", type=int, default=20, help="random subnets to compare predicted with measured latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default=None, help="check an existing table instead of building one")
    p.set_defaults(func=run)


def run(args) -> int:
    from ...measure.latency import build_table, check_table, load_table, save_table
    from ...space import parse_int_list
    from ...utils.devices import resolve_device
    from ...utils.files import ensure_output_file

    net = None
    if args.ckpt:
        from ...models import load_supernet

        net, ckpt = load_supernet(args.ckpt)
        space, bits = ckpt.space, ckpt.bits
    else:
        space, bits = space_from_args(args), args.bits
    device = resolve_device(args.device)
    if args.out:
        ensure_output_file(args.out, "--out")
    if args.table:
        table = load_table(args.table, space)
        out = args.table
    else:
        res = parse_int_list(args.resolutions, "resolutions") if args.resolutions else None
        table = build_table(space, bits, net=net, resolutions=res, batch_size=args.batch_size, threads=args.threads,
                            warmup=args.warmup, repeats=args.repeats, device=device, stat=args.stat, clock=args.clock)
        out = args.out
        print(f"{len(table['entries'])} entries measured on {table['device_name']} "
              f"({args.threads} thread(s), batch {args.batch_size})")
    if args.check > 0:
        report = check_table(table, space, args.check, net=net, seed=args.seed)
        table["check"] = {k: v for k, v in report.items() if k != "subnets"}
        table["check"]["subnets"] = report["subnets"]
        print(f"predicted vs measured latency on {args.check} random subnets: mean |error| "
              f"{100 * report['mean_abs_rel_error']:.1f}% (max {100 * report['max_abs_rel_error']:.1f}%, "
              f"mean bias {100 * report['mean_rel_bias']:+.1f}%), Kendall tau {report['kendall_tau']:.3f}")
    save_table(table, out)
    print(f"table written to {out}")
    return 0
