"""The run report of ``oqat run``: ``RUN/report.md`` and a self-contained ``RUN/report.html``.

Both are rendered from the same list of blocks (headings, paragraphs, tables, figures, code)
built from the stage markers (``RUN/<stage>/stage.json``) and the search outputs
(``RUN/search-<b>bit/evaluated.csv``). Figures are PNGs written with matplotlib's Agg backend
into ``RUN/report_files/``; the Markdown links them by relative path, the HTML embeds them as
base64 so it can be mailed or opened anywhere. Links to exported models are relative paths.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from ..utils.fmt import fmt_s, pct, si

FILES = "report_files"


# ============================================================================ document model
@dataclass
class Link:
    text: str
    href: str


@dataclass
class Block:
    kind: str                 # h1 | h2 | p | table | img | pre | note
    text: str = ""
    headers: list | None = None
    rows: list | None = None
    path: str = ""            # img: path relative to the run folder
    align: list | None = None  # table: "l" / "r" per column


def _cell_md(v: Any) -> str:
    if isinstance(v, Link):
        return f"[{v.text}]({v.href})"
    if isinstance(v, list):
        return "<br>".join(_cell_md(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _cell_html(v: Any) -> str:
    if isinstance(v, Link):
        return f'<a href="{html.escape(v.href)}">{html.escape(v.text)}</a>'
    if isinstance(v, list):
        return "<br>".join(_cell_html(x) for x in v)
    return html.escape(str(v))


def _inline_md_to_html(text: str) -> str:
    """Paragraph text: escape, then **bold** and `code` (the only markup the report uses)."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"`(.+?)`", r"<code>\1</code>", t)
    return t


def render_md(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind in ("p", "note"):
            out.append(("> " if b.kind == "note" else "") + b.text + "\n")
        elif b.kind == "table":
            align = b.align or ["l"] * len(b.headers)
            out.append("| " + " | ".join(_cell_md(h) for h in b.headers) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")  # l, w: left
            for row in b.rows:
                out.append("| " + " | ".join(_cell_md(c) for c in row) + " |")
            out.append("")
        elif b.kind == "img":
            out.append(f"![{b.text}]({b.path})\n")
        elif b.kind == "pre":
            out.append("```yaml\n" + b.text.rstrip() + "\n```\n")
    return "\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2329;
       max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; line-height: 1.45; background: #fff; }
h1 { font-size: 1.8em; margin: 0.2em 0 0.3em; border-bottom: 3px solid #2f6fb3; padding-bottom: 0.2em; }
h2 { font-size: 1.3em; margin: 1.6em 0 0.5em; color: #204a78; border-bottom: 1px solid #d5dde5; padding-bottom: 0.15em; }
p { margin: 0.4em 0 0.8em; }
.tw { overflow-x: auto; margin: 0.4em 0 1.2em; }
table { border-collapse: collapse; font-size: 0.88em; }
th, td { border: 1px solid #cfd8e1; padding: 4px 9px; vertical-align: top; }
th { background: #eef3f8; text-align: left; vertical-align: bottom; }
td { white-space: nowrap; }
td.w { white-space: normal; min-width: 16em; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8fafc; }
code { background: #f1f3f5; padding: 0 3px; border-radius: 3px; font-size: 0.92em; }
pre { background: #f6f8fa; border: 1px solid #dfe4ea; padding: 10px 14px; overflow-x: auto; font-size: 0.82em;
      line-height: 1.35; }
figure { margin: 0.6em 0.5% 1.4em 0; display: inline-block; vertical-align: top; width: 49%; }
td:first-child { white-space: nowrap; }
figure img { max-width: 100%; border: 1px solid #e1e6eb; }
figcaption { font-size: 0.85em; color: #5a6570; }
.note { border-left: 4px solid #e0a800; background: #fff8e1; padding: 6px 12px; margin: 0.6em 0; }
.headline { font-size: 1.05em; }
a { color: #1f5fa8; }
details summary { cursor: pointer; color: #204a78; font-weight: 600; }
"""


def render_html(blocks: list[Block], run_dir: Path, title: str) -> str:
    body = []
    in_details = False
    for b in blocks:
        if b.kind == "h1":
            body.append(f"<h1>{html.escape(b.text)}</h1>")
        elif b.kind == "h2":
            body.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_md_to_html(b.text)}</p>")
        elif b.kind == "note":
            body.append(f'<div class="note">{_inline_md_to_html(b.text)}</div>')
        elif b.kind == "table":
            align = b.align or ["l"] * len(b.headers)
            head = "".join(f'<th class="{a}">{_cell_html(h)}</th>' for h, a in zip(b.headers, align))
            rows = "".join("<tr>" + "".join(f'<td class="{a}">{_cell_html(c)}</td>' for c, a in zip(r, align)) + "</tr>"
                           for r in b.rows)
            body.append(f'<div class="tw"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif b.kind == "img":
            data = base64.b64encode((run_dir / b.path).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "pre":
            body.append(f"<details open><summary>configuration (YAML)</summary><pre>{html.escape(b.text)}</pre></details>")
    del in_details
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ============================================================================ formatting
def arch_summary(space, arch: dict) -> str:
    """``r 28 · d 2-3-2-4-2 · k 4.2 · e 3.9`` (mean kernel and expand ratio over the active blocks)."""
    from ..space import Arch

    a = Arch.from_dict(arch)
    active = space.active_blocks(a)
    k = sum(a.ks[i] for i in active) / len(active)
    e = sum(a.e[i] for i in active) / len(active)
    return f"r {a.r} · d {'-'.join(map(str, a.d))} · k̄ {k:.1f} · ē {e:.1f}"


def bits_label(bits: int) -> str:
    return "FP" if bits == 32 else f"{bits}-bit"


# ============================================================================ figures
_COLORS = {4: "tab:blue", 3: "tab:green", 2: "tab:red", 5: "tab:purple", 6: "tab:brown", 8: "tab:gray"}


def _read_points(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: (float(v) if k in ("accuracy", "macs", "bitops", "params", "size_bits", "oqa_flops") else v)
                 for k, v in row.items()} for row in csv.DictReader(fh)]


def pareto_figure(out: Path, metric: str, series: dict[int, list[dict]], chosen: dict[int, list[dict]],
                  baseline: dict | None, label: str) -> None:

    from ..search import pareto_front

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for bits in sorted(series, reverse=True):
        pts = series[bits]
        if not pts:
            continue
        c = _COLORS.get(bits, None)
        xs, ys = [p[metric] for p in pts], [p["accuracy"] for p in pts]
        ax.scatter(xs, ys, s=10, color=c, alpha=0.25, linewidths=0)
        idx = pareto_front(xs, ys)
        ax.plot([xs[i] for i in idx], [ys[i] for i in idx], "o-", color=c, ms=3.5, lw=1.4, drawstyle="steps-post",
                label=f"{bits}-bit front ({len(pts)} subnets)")
        for ch in chosen.get(bits, []):
            ax.scatter([ch["costs"][metric]], [ch["holdout_top1"]], marker="*", s=140, color=c, edgecolors="black",
                       linewidths=0.6, zorder=5)
    if baseline is not None:
        ax.scatter([baseline["costs"][metric]], [baseline["holdout_top1"]], marker="X", s=110, color="black",
                   zorder=6, label=f"baseline {baseline['name']} ({baseline['arch']['bits']}-bit, alone)")
    ax.scatter([], [], marker="*", s=110, color="white", edgecolors="black", label="chosen subnets")
    from matplotlib.ticker import FuncFormatter

    if metric == "bitops":
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: si(v, 2) if str(v)[0] in "2357" else ""))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v, 3)))
    ax.tick_params(axis="x", which="both", labelsize=7.5)
    ax.set_xlabel(label)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"Accuracy vs {label}, every bit-width")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def training_figure(out: Path, curves: dict[str, list[tuple[float, float]]]) -> bool:
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    offset = 0.0
    for name, pts in curves.items():
        if name == "baseline":  # trained alone from scratch: drawn from 0 for comparison
            ax.plot([x for x, _ in pts], [y for _, y in pts], "--", c="black", lw=1.0, label="baseline (alone)")
            continue
        xs = [offset + x for x, _ in pts]
        ax.plot(xs, [y for _, y in pts], lw=1.2, label=name)
        offset = xs[-1]
    ax.set_xlabel("epochs (OQAT stages one after the other)")
    ax.set_ylabel("training loss of the largest subnet")
    ax.set_title("Training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def _curve(metrics: Path) -> list[tuple[float, float]]:
    pts = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss_largest" in r and r.get("loss_largest") is not None:
                pts.append((float(r["epoch"]), float(r["loss_largest"])))
    pts.sort()
    return pts


# ============================================================================ the report
def build_blocks(run_dir: Path, pipe) -> list[Block]:
    cfg = pipe.cfg
    markers = pipe.markers
    space = pipe.space
    files = run_dir / FILES
    files.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = [Block("h1", f"OQAT run: {cfg.name}")]
    if cfg.description:
        blocks.append(Block("p", cfg.description.strip()))
    import torch

    data = pipe.data_cfg
    total = sum(m.get("wall_s", 0) for m in markers.values())
    blocks.append(Block("p", f"Run folder `{run_dir}` · space **{space.name}** "
                             f"({space.describe().split(': ', 1)[1]}) · data **{data.name}**"
                             + (f" (train limit {data.train_limit})" if data.train_limit else "")
                             + f" · report written {time.strftime('%Y-%m-%d %H:%M')} · "
                             f"total stage time {fmt_s(total)} · torch {torch.__version__} on "
                             f"{platform.machine()} ({getattr(pipe, 'device', 'cpu')})."))
    pending = [s.name for s in pipe.stages if s.name not in markers]
    if pending:
        blocks.append(Block("note", f"Stages not finished yet: {', '.join(pending)}. This report shows what is done."))

    searches = {m["results"]["bits"]: m["results"] for n, m in markers.items() if n.startswith("search-")}
    baseline = markers.get("baseline", {}).get("results")
    exports = {}
    for row in markers.get("export", {}).get("results", {}).get("exports", []):
        exports[(row["bits"], row["budget"])] = row

    # -- headline
    oqat_epochs = sum(markers[s]["results"].get("epochs_done") or 0 for s in pipe.train_stages if s in markers)
    cmp = _comparison(searches, baseline, oqat_epochs)
    rows = []
    for bits in sorted(searches, reverse=True):
        chosen = searches[bits]["chosen"]
        if chosen:
            best = max(chosen, key=lambda c: c["holdout_top1"])  # chosen on held-out data, never on test
            rows.append([bits_label(bits), pct(best["holdout_top1"]), pct(best["test_top1"]), si(best["costs"]["macs"]),
                         si(best["costs"]["bitops"]), best["budget"]["name"]])
    if rows:
        blocks.append(Block("h2", "Summary"))
        blocks.append(Block("p", "The best chosen subnet of each bit-width (the one with the highest held-out top-1; "
                                 "the test split is only reported)."))
        blocks.append(Block("table", headers=["bits", "held-out top-1", "test top-1", "MACs", "BitOPs",
                                              "budget"], rows=rows, align=["l", "r", "r", "r", "r", "l"]))
    if cmp:
        d = cmp["oqat"]["test_top1"] - cmp["base"]["test_top1"]
        blocks.append(Block("p", f"**Headline comparison:** the best OQAT {cmp['bits']}-bit subnet at no more BitOPs "
                                 f"than the baseline `{cmp['base']['name']}` reaches {cmp['oqat']['test_top1']:.2f}% "
                                 f"test top-1, the baseline trained alone {cmp['base']['test_top1']:.2f}% "
                                 f"(**{d:+.2f} points**)."))

    # -- stages and time
    blocks.append(Block("h2", "Stages and time"))
    rows = []
    for s in pipe.stages:
        m = markers.get(s.name)
        r = (m or {}).get("results", {})
        detail = ""
        if s.kind in ("fp", "train") and r:
            detail = f"{r['steps']} steps × {r['batch_size']} images" + (
                f" = {r['epochs_done']:.2f} epochs" if r.get("epochs_done") is not None else "")
        elif s.kind == "baseline" and r:
            t = r["train"]
            detail = f"{t['steps']} steps × {t['batch_size']} images = {t['epochs_done']:.2f} epochs"
        elif s.kind == "search" and r:
            spe = r.get("seconds_per_evaluation")
            detail = f"{r['evaluated']} subnets measured" + (f", {spe:.2f} s each" if spe else "") + (
                f" ({r['cache_reused']} from the cache)" if r.get("cache_reused") else "")
        elif s.kind == "export" and r:
            detail = f"{sum(1 for x in r['exports'] if not x.get('same_as'))} distinct subnets"
        rows.append([s.name, s.title, "done" if m else "pending", fmt_s(m.get("wall_s")) if m else "–", detail])
    rows.append(["total", "", "", fmt_s(total), ""])
    blocks.append(Block("table", headers=["stage", "what", "state", "wall time", "work"], rows=rows,
                        align=["l", "w", "l", "r", "w"]))
    blocks.append(Block("p", "Wall time is that of the invocation that completed the stage (a stage resumed "
                             "after an interruption counts only its last part)."))

    # -- supernets
    if searches:
        blocks.append(Block("h2", "Supernet accuracy per bit-width"))
        any_r = next(iter(searches.values()))
        blocks.append(Block("p", f"Top-1 (%) of the largest and smallest subnets, each extracted and BN-re-calibrated "
                                 f"on {any_r['calib_images']} held-out images; held-out on "
                                 f"{any_r['holdout_images'] or 'all'} held-out images, test on "
                                 f"{any_r['test_images']} test images."))
        rows = []
        for bits in sorted(searches, reverse=True):
            sn = searches[bits]["supernet"]
            rows.append([bits_label(bits), pct(sn["largest"]["holdout_top1"]), pct(sn["largest"]["test_top1"]),
                         si(sn["largest"]["costs"]["macs"]), pct(sn["smallest"]["holdout_top1"]),
                         pct(sn["smallest"]["test_top1"]), si(sn["smallest"]["costs"]["macs"])])
        blocks.append(Block("table", headers=["bits", "largest held-out", "largest test", "largest MACs",
                                              "smallest held-out", "smallest test", "smallest MACs"],
                            rows=rows, align=["l"] + ["r"] * 6))

        # -- Pareto fronts
        series = {b: _read_points(run_dir / r["evaluated_csv"]) for b, r in searches.items()}
        chosen = {b: r["chosen"] for b, r in searches.items()}
        blocks.append(Block("h2", "Pareto fronts"))
        blocks.append(Block("p", "Every subnet measured during the searches (faint dots), the front of each "
                                 "bit-width (line), the chosen subnet per budget (stars) and the baseline trained "
                                 "alone (cross). Accuracy is held-out top-1, the search's objective; BitOPs on a "
                                 "log scale (each bit removed divides a layer's BitOPs)."))
        for metric, label in (("bitops", "BitOPs"), ("macs", "MACs")):
            name = f"{FILES}/pareto_{metric}.png"
            pareto_figure(run_dir / name, metric, series, chosen, baseline, label)
            blocks.append(Block("img", f"held-out top-1 vs {label}", path=name))

        # -- chosen subnets
        blocks.append(Block("h2", "Chosen subnets"))
        rows = []
        has_lat = any("latency_ms_torch" in x for x in exports.values())
        for bits in sorted(searches, reverse=True):
            for c in searches[bits]["chosen"]:
                ex = exports.get((bits, c["budget"]["name"]), {})
                links = [Link(Path(f["path"]).name, f["path"]) for f in ex.get("files", {}).values()]
                limits = ", ".join(f"{k} ≤ {si(v)}" for k, v in c["budget"]["constraints"].items())
                row = [bits_label(bits), [c["budget"]["name"], limits], arch_summary(space, c["arch"]),
                       pct(c["holdout_top1"]), pct(c["test_top1"]), si(c["costs"]["macs"]), si(c["costs"]["bitops"]),
                       f"{c['costs']['size_bits'] / 8 / 1024:.1f}"]
                if has_lat:
                    lt, lo = ex.get("latency_ms_torch"), ex.get("latency_ms_onnx")
                    row.append(" / ".join(f"{v:.2f}" if v is not None else "–" for v in (lt, lo)))
                row += [links or "–", Link(Path(c["file"]).name, c["file"])]
                rows.append(row)
        headers = ["bits", "budget", "arch", "held-out top-1", "test top-1", "MACs", "BitOPs", "size (KiB)"]
        if has_lat:
            headers.append(["latency ms", "torch / ONNX"])
        headers += ["exported", "arch file"]
        blocks.append(Block("table", headers=headers, rows=rows,
                            align=["l", "l", "l", "r", "r", "r", "r", "r"] + (["r"] if has_lat else []) + ["l", "l"]))
        notes = ["arch: input resolution, depth per stage, mean kernel size and expand ratio of the active blocks "
                 "(the full arch is in the arch file). Size: weights at their bit-width, everything else at 32 bit."]
        if has_lat:
            notes.append("Latency: batch 1, one thread, median of the thread's CPU time, on this machine; the PyTorch "
                         "figure is the fake-quantized model, the ONNX one onnxruntime on the exported QCDQ graph. "
                         "Neither is an integer low-bit kernel.")
        blocks.append(Block("p", " ".join(notes)))
        ver = []
        for (bits, budget), ex in exports.items():
            if ex.get("same_as"):
                continue
            for fmt, f in ex.get("files", {}).items():
                agree = f.get("top1_agreement")
                ver.append([Link(Path(f["path"]).name, f["path"]), fmt, f"{f['size_bytes'] / 1024:.1f}",
                            {True: "passed", False: "FAILED", None: "skipped"}[f.get("verified")],
                            "–" if agree is None else f"{100 * agree:.2f}%",
                            f"{pct(f.get('holdout_top1_file'))} / {pct(f.get('holdout_top1_torch'))}",
                            pct(f.get("test_top1")), pct(ex.get("search_test_top1"))])
        if ver:
            exp = markers["export"]["results"]
            blocks.append(Block("p", f"Exported models. Each file is the subnet as the search measured it (BN "
                                     f"re-calibrated on {exp.get('calib_images')} held-out images, batch "
                                     f"{exp.get('calib_batch')}, seed {exp.get('calib_seed')}), checked against the "
                                     f"PyTorch subnet on held-out images (`oqat export` verification), then scored on "
                                     f"its own on the test images as deployed (onnxruntime for ONNX, the rebuilt "
                                     f"model for .oqat) next to the search's test figure for the same subnet."))
            blocks.append(Block("table", headers=["file", "format", "KiB", "verification", "top-1 agreement",
                                                  ["held-out top-1", "file / PyTorch"], ["test top-1", "the file"],
                                                  ["test top-1", "search"]],
                                rows=ver, align=["l", "l", "r", "l", "r", "r", "r", "r"]))

    # -- baseline
    if baseline is not None:
        blocks.append(Block("h2", "Baseline comparison"))
        b = baseline
        rows = [[f"baseline {b['name']} (trained alone)", arch_summary(space, b["arch"]), bits_label(b["arch"]["bits"]),
                 si(b["costs"]["macs"]), si(b["costs"]["bitops"]), f"{b['epochs']:.2f}", pct(b["holdout_top1"]),
                 pct(b["test_top1"])]]
        if cmp:
            o = cmp["oqat"]
            rows.append([f"OQAT best {cmp['bits']}-bit subnet at ≤ the baseline's BitOPs", arch_summary(space, o["arch"]),
                         bits_label(cmp["bits"]), si(o["costs"]["macs"]), si(o["costs"]["bitops"]),
                         f"{cmp['oqat_epochs']:.2f}" if cmp["oqat_epochs"] is not None else "–",
                         pct(o["holdout_top1"]), pct(o["test_top1"])])
        blocks.append(Block("table", headers=["network", "arch", "bits", "MACs", "BitOPs", "epochs", "held-out top-1",
                                              "test top-1"], rows=rows, align=["w", "l", "l", "r", "r", "r", "r", "r"]))
        same = (markers.get("baseline", {}).get("spec", {}).get("schedule") != "explicit")
        text = (f"The baseline is the fixed subnet named in the config (`stages.baseline.arch`, chosen before any "
                f"search), trained on its own with LSQ at {b['arch']['bits']} bit on the labels for "
                f"{b['epochs']:.2f} epochs" + (", the same number of training images as all OQAT training stages "
                                                "together (the epochs column of the OQAT row). " if same else ". ") +
                "The OQAT subnet is the best one the search found under a BitOPs budget equal to the baseline's; "
                "both are measured the same way (BN re-calibration on held-out images).")
        if cmp:
            text += (f" Difference on the test split: **{cmp['oqat']['test_top1'] - cmp['base']['test_top1']:+.2f} "
                     f"points** for OQAT.")
        blocks.append(Block("p", text))

    # -- training curves
    curves = {}
    for s in pipe.stages:
        if s.kind in ("fp", "train", "baseline") and s.name in markers:
            curves[s.name] = _curve(run_dir / s.name / "metrics.jsonl")
    name = f"{FILES}/training.png"
    if training_figure(run_dir / name, curves):
        blocks.append(Block("h2", "Training curves"))
        blocks.append(Block("img", "training loss of the largest subnet (baseline: its only network), per stage",
                            path=name))

    # -- configuration
    blocks.append(Block("h2", "Configuration"))
    blocks.append(Block("p", "The resolved configuration (also in `config.yaml`); each stage's own settings and "
                             "results are in `<stage>/stage.json`."))
    from ..utils.config import to_dict

    blocks.append(Block("pre", yaml.safe_dump(to_dict(cfg), sort_keys=False, width=110, default_flow_style=None)))
    return blocks


def _comparison(searches: dict, baseline: dict | None, oqat_epochs: float | None) -> dict | None:
    if baseline is None:
        return None
    bits = baseline["arch"]["bits"]
    r = searches.get(bits)
    if r is None:
        return None
    limit = baseline["costs"]["bitops"]
    fits = [c for c in r["chosen"] if c["costs"]["bitops"] <= limit * (1 + 1e-9)]
    if not fits:
        return None
    named = [c for c in fits if c["budget"]["name"] == "baseline"]
    best = named[0] if named else max(fits, key=lambda c: c["holdout_top1"])
    return {"bits": bits, "oqat": best, "base": baseline, "oqat_epochs": oqat_epochs}


def write_report(run_dir: str | Path, pipe) -> Path:
    """Write RUN/report.md and RUN/report.html; returns the Markdown path."""
    run_dir = Path(run_dir)
    blocks = build_blocks(run_dir, pipe)
    md = run_dir / "report.md"
    md.write_text(render_md(blocks))
    (run_dir / "report.html").write_text(render_html(blocks, run_dir, f"OQAT run {pipe.cfg.name}"))
    return md


__all__ = ["write_report", "build_blocks", "render_md", "render_html", "pareto_figure", "si", "arch_summary"]
