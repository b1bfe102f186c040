"""The run report of ``oqat run``: ``RUN/report.md`` and a self-contained ``RUN/report.html``.

Both are rendered from one list of blocks built from a :class:`~oqat.pipeline.summary.RunSummary`
(the run folder read back: ``run.json``, each stage's ``stage.json``, the search outputs), so
the report can be rebuilt from the folder alone. Figures are PNGs in ``RUN/report_files/``; the
Markdown links them, the HTML embeds them. Links to exported models are relative paths.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

from ...export.deployment import DeploymentRow
from ...space import Arch
from ...utils.fmt import fmt_s, pct, si
from ..results import BaselineOutcome, ChosenSubnet, ExportOutcome, ExportRow, SearchOutcome
from ..summary import RunSummary
from .document import Block, Link, render_html, render_md
from .figures import pareto_figure, read_curve, read_points, training_figure

FILES = "report_files"


def arch_summary(space, arch: dict) -> str:
    """``r 28 · d 2-3-2-4-2 · k 4.2 · e 3.9`` (mean kernel and expand ratio over the active blocks)."""
    a = Arch.from_dict(arch)
    active = space.active_blocks(a)
    k = sum(a.ks[i] for i in active) / len(active)
    e = sum(a.e[i] for i in active) / len(active)
    return f"r {a.r} · d {'-'.join(map(str, a.d))} · k̄ {k:.1f} · ē {e:.1f}"


def bits_label(bits: int) -> str:
    return "FP" if bits == 32 else f"{bits}-bit"


def _steps(t) -> str:
    """``1500 steps × 64 images (2 processes)``: the global batch of a training stage."""
    procs = f" ({t.world_size} processes)" if t.world_size > 1 else ""
    return f"{t.steps} steps × {t.batch_size * t.world_size} images{procs}"


def _comparison(searches: dict[int, SearchOutcome], baseline: BaselineOutcome | None,
                oqat_epochs: float | None) -> dict | None:
    """The best OQAT subnet at no more BitOPs than the baseline (its own budget when searched)."""
    if baseline is None or baseline.arch["bits"] not in searches:
        return None
    bits = baseline.arch["bits"]
    limit = baseline.costs["bitops"]
    fits = [c for c in searches[bits].chosen if c.costs["bitops"] <= limit * (1 + 1e-9)]
    if not fits:
        return None
    named = [c for c in fits if c.budget["name"] == "baseline"]
    best = named[0] if named else max(fits, key=lambda c: c.holdout_top1)
    return {"bits": bits, "oqat": best, "base": baseline, "oqat_epochs": oqat_epochs}


class _Report:
    """Builds the blocks section by section from one RunSummary."""

    def __init__(self, run: RunSummary):
        self.run = run
        self.blocks: list[Block] = []
        self.searches = {o.bits: o for o in run.of_kind("search").values()}
        self.baseline: BaselineOutcome | None = run.outcomes.get("baseline")
        export: ExportOutcome | None = run.outcomes.get("export")
        self.export = export
        self.exports: dict[tuple[int, str], ExportRow] = {(r.bits, r.budget): r for r in (export.exports if export else [])}
        epochs = [run.outcomes[s].epochs_done or 0 for s in run.train_stages if s in run.outcomes]
        self.cmp = _comparison(self.searches, self.baseline, sum(epochs))

    def add(self, kind: str, text: str = "", **kw) -> None:
        self.blocks.append(Block(kind, text, **kw))

    def build(self) -> list[Block]:
        (self.run.out / FILES).mkdir(parents=True, exist_ok=True)
        for section in (self.header, self.summary, self.stages, self.supernets, self.fronts, self.chosen,
                        self.files, self.deployment, self.baseline_section, self.curves, self.configuration):
            section()
        return self.blocks

    def header(self) -> None:
        run, space, data = self.run, self.run.space, self.run.data
        self.add("h1", f"OQAT run: {run.name}")
        if run.description:
            self.add("p", run.description.strip())
        total = sum(m.get("wall_s", 0) for m in run.markers.values())
        self.add("p", f"Run folder `{run.out}` · space **{space.name}** ({space.describe().split(': ', 1)[1]}) · data "
                      f"**{data.name}**" + (f" (train limit {data.train_limit})" if data.train_limit else "")
                 + f" · report written {time.strftime('%Y-%m-%d %H:%M')} · total stage time {fmt_s(total)} · torch "
                   f"{run.torch_version} on {run.machine} ({run.device}).")
        pending = [s.name for s in run.stages if s.name not in run.markers]
        if pending:
            self.add("note", f"Stages not finished yet: {', '.join(pending)}. This report shows what is done.")

    def summary(self) -> None:
        rows = []
        for bits in sorted(self.searches, reverse=True):
            chosen = self.searches[bits].chosen
            if chosen:
                best = max(chosen, key=lambda c: c.holdout_top1)  # chosen on held-out data, never on test
                rows.append([bits_label(bits), pct(best.holdout_top1), pct(best.test_top1), si(best.costs["macs"]),
                             si(best.costs["bitops"]), best.budget["name"]])
        if rows:
            self.add("h2", "Summary")
            self.add("p", "The best chosen subnet of each bit-width (the one with the highest held-out top-1; the test "
                          "split is only reported).")
            self.add("table", headers=["bits", "held-out top-1", "test top-1", "MACs", "BitOPs", "budget"], rows=rows,
                     align=["l", "r", "r", "r", "r", "l"])
        if self.cmp:
            o, b = self.cmp["oqat"], self.cmp["base"]
            self.add("p", f"**Headline comparison:** the best OQAT {self.cmp['bits']}-bit subnet at no more BitOPs than "
                          f"the baseline `{b.name}` reaches {o.test_top1:.2f}% test top-1, the baseline trained alone "
                          f"{b.test_top1:.2f}% (**{o.test_top1 - b.test_top1:+.2f} points**).")

    def stages(self) -> None:
        run = self.run
        self.add("h2", "Stages and time")
        rows = []
        for s in run.stages:
            m, r = run.markers.get(s.name), run.outcomes.get(s.name)
            detail = ""
            if s.kind in ("fp", "train") and r:
                detail = _steps(r) + (f" = {r.epochs_done:.2f} epochs" if r.epochs_done is not None else "")
            elif s.kind == "baseline" and r:
                detail = f"{_steps(r.train)} = {r.train.epochs_done:.2f} epochs"
            elif s.kind == "search" and r:
                spe = r.seconds_per_evaluation
                detail = f"{r.evaluated} subnets measured" + (f", {spe:.2f} s each" if spe else "") + (
                    f" ({r.cache_reused} from the cache)" if r.cache_reused else "")
            elif s.kind == "export" and r:
                detail = f"{sum(1 for x in r.exports if not x.same_as)} distinct subnets"
            rows.append([s.name, s.title, "done" if m else "pending", fmt_s(m.get("wall_s")) if m else "–", detail])
        rows.append(["total", "", "", fmt_s(sum(m.get("wall_s", 0) for m in run.markers.values())), ""])
        self.add("table", headers=["stage", "what", "state", "wall time", "work"], rows=rows,
                 align=["l", "w", "l", "r", "w"])
        self.add("p", "Wall time is that of the invocation that completed the stage (a stage resumed after an "
                      "interruption counts only its last part).")

    def supernets(self) -> None:
        if not self.searches:
            return
        self.add("h2", "Supernet accuracy per bit-width")
        r = next(iter(self.searches.values()))
        self.add("p", f"Top-1 (%) of the largest and smallest subnets, each extracted and BN-re-calibrated on "
                      f"{r.calib_images} held-out images; held-out on "
                      f"{r.final_images if r.finalists else (r.holdout_images or 'all')} held-out images, "
                      f"test on {r.test_images} test images.")
        rows = []
        for bits in sorted(self.searches, reverse=True):
            big, small = self.searches[bits].supernet["largest"], self.searches[bits].supernet["smallest"]
            rows.append([bits_label(bits), pct(big.holdout_top1), pct(big.test_top1), si(big.costs["macs"]),
                         pct(small.holdout_top1), pct(small.test_top1), si(small.costs["macs"])])
        self.add("table", headers=["bits", "largest held-out", "largest test", "largest MACs", "smallest held-out",
                                   "smallest test", "smallest MACs"], rows=rows, align=["l"] + ["r"] * 6)

    def _plotted(self, chosen: list[ChosenSubnet], points: list[dict]) -> list[ChosenSubnet]:
        """The chosen subnets at the search's own score, the plot's y axis (finalists re-measure
        the chosen on more images; that figure would float off the subnet's dot)."""
        key = self.run.space.key
        score = {key(Arch.from_dict(json.loads(p["arch"]))): p["accuracy"] for p in points if p.get("arch")}
        return [dataclasses.replace(c, holdout_top1=score.get(key(Arch.from_dict(c.arch)), c.holdout_top1))
                for c in chosen]

    def fronts(self) -> None:
        if not self.searches:
            return
        series = {b: read_points(self.run.out / r.evaluated_csv) for b, r in self.searches.items()}
        chosen = {b: self._plotted(r.chosen, series[b]) for b, r in self.searches.items()}
        self.add("h2", "Pareto fronts")
        self.add("p", "Every subnet measured during the searches (faint dots), the front of each bit-width (line), the "
                      "chosen subnet per budget (stars) and the baseline trained alone (cross). Accuracy is held-out "
                      "top-1, the search's objective; BitOPs on a log scale (each bit removed divides a layer's "
                      "BitOPs)." + (" A star off the front is a finalist that scored best when re-measured on more "
                                    "held-out images (the chosen-subnets table has that figure)."
                                    if any(r.finalists for r in self.searches.values()) else ""))
        for metric, label in (("bitops", "BitOPs"), ("macs", "MACs")):
            name = f"{FILES}/pareto_{metric}.png"
            pareto_figure(self.run.out / name, metric, series, chosen, self.baseline, label)
            self.add("img", f"held-out top-1 vs {label}", path=name)

    def chosen(self) -> None:
        if not self.searches:
            return
        self.add("h2", "Chosen subnets")
        space = self.run.space
        has_lat = any(x.latency_ms_torch is not None for x in self.exports.values())
        rows = []
        for bits in sorted(self.searches, reverse=True):
            for c in self.searches[bits].chosen:
                ex = self.exports.get((bits, c.budget["name"]))
                links = [Link(Path(f.path).name, f.path) for f in ex.files.values()] if ex else []
                limits = ", ".join(f"{k} ≤ {si(v)}" for k, v in c.budget["constraints"].items())
                row = [bits_label(bits), [c.budget["name"], limits], arch_summary(space, c.arch), pct(c.holdout_top1),
                       pct(c.test_top1), si(c.costs["macs"]), si(c.costs["bitops"]), f"{c.costs['size_bits'] / 8 / 1024:.1f}"]
                if has_lat:
                    lat = (ex.latency_ms_torch, ex.latency_ms_onnx) if ex else (None, None)
                    row.append(" / ".join(f"{v:.2f}" if v is not None else "–" for v in lat))
                rows.append(row + [links or "–", Link(Path(c.file).name, c.file)])
        headers = ["bits", "budget", "arch", "held-out top-1", "test top-1", "MACs", "BitOPs", "size (KiB)"]
        headers += [["latency ms", "torch / ONNX"]] if has_lat else []
        self.add("table", headers=headers + ["exported", "arch file"], rows=rows,
                 align=["l", "l", "l", "r", "r", "r", "r", "r"] + (["r"] if has_lat else []) + ["l", "l"])
        notes = ["arch: input resolution, depth per stage, mean kernel size and expand ratio of the active blocks (the "
                 "full arch is in the arch file). Size: weights at their bit-width, everything else at 32 bit."]
        r = next(iter(self.searches.values()))  # one search configuration for every bit-width
        if r.finalists:
            notes.append(f"Held-out top-1 of the chosen subnets: the {r.finalists} best of each budget by the search's "
                         f"score on {r.holdout_images or 'all'} held-out images, re-measured on {r.final_images} "
                         "held-out images; that figure decides the choice.")
        if has_lat:
            notes.append("Latency: batch 1, one thread, median of the thread's CPU time, on this machine; the PyTorch "
                         "figure is the fake-quantized model, the ONNX one onnxruntime on the exported QCDQ graph. "
                         "Neither is an integer low-bit kernel.")
        self.add("p", " ".join(notes))

    def files(self) -> None:
        rows = []
        for ex in self.exports.values():
            if ex.same_as:
                continue
            for fmt, f in ex.files.items():
                rows.append([Link(Path(f.path).name, f.path), fmt, f.engine or "–", f"{f.size_bytes / 1024:.1f}",
                             {True: "passed", False: "FAILED", None: "skipped"}[f.verified],
                             "–" if f.top1_agreement is None else f"{100 * f.top1_agreement:.2f}%",
                             f"{pct(f.holdout_top1_file)} / {pct(f.holdout_top1_torch)}", pct(f.test_top1),
                             pct(ex.search_test_top1)])
        if not rows:
            return
        e = self.export
        self.add("p", f"Exported models. Each file is the subnet as the search measured it (BN re-calibrated on "
                      f"{e.calib_images} held-out images, batch {e.calib_batch}, seed {e.calib_seed}), checked against "
                      f"the PyTorch subnet on held-out images (`oqat export` verification), then scored on its own on "
                      f"the test images as deployed (on the engine `oqat predict` picks: OpenVINO for a QCDQ file it "
                      f"verified, else onnxruntime; PyTorch for .oqat) next to the search's test figure for the same "
                      f"subnet.")
        self.add("table", headers=["file", "format", "engine", "KiB", "verification", "top-1 agreement",
                                   ["held-out top-1", "file / PyTorch"], ["test top-1", "the file"],
                                   ["test top-1", "search"]], rows=rows,
                 align=["l", "l", "l", "r", "l", "r", "r", "r", "r"])

    def deployment(self) -> None:
        rows = [x for x in self.exports.values() if x.deployment and not x.same_as]
        if not rows:
            return
        self.add("h2", "Deployment")
        d0 = rows[0].deployment
        self.add("p", f"Per exported subnet: file sizes, the weight memory a runtime holds, and the median latency "
                      f"of {d0['runs']} interleaved runs at batch 1 and 32 on {d0['engine']}, {d0['threads']} thread, "
                      f"on {d0['cpu'] or 'this CPU'} (best integer instruction set: {d0['isa']}). FP32 is the same "
                      f"subnet with its quantizers disabled; QCDQ the `onnx` file, integer the `onnx-int` file; "
                      f"x FP32 is FP32's latency over the file's (above 1: faster).")
        if any(x.deployment.get("openvino") for x in rows):
            self.add("p", f"The rows *on OpenVINO* time the FP32 and QCDQ files on OpenVINO "
                          f"{next(x.deployment['openvino'] for x in rows if x.deployment.get('openvino'))} CPU, "
                          f"same threads, interleaved with each other; their x FP32 is over OpenVINO's own FP32. "
                          f"OpenVINO runs the QCDQ file's convolutions on integer kernels.")
        num = lambda v, f: "–" if v is None else f.format(v)  # noqa: E731
        for x in rows:
            d = DeploymentRow.from_dict(x.deployment)
            table = [[label, f"{size / 1024:.1f}", num(weights and weights / 1024, "{:.1f}"), num(ms1, "{:.2f}"),
                      num(ms32, "{:.1f}"), f"{num(sp1, '{:.2f}')} / {num(sp32, '{:.2f}')}"]
                     for label, size, weights, ms1, ms32, sp1, sp32 in d.cells()]
            self.add("p", f"**{bits_label(x.bits)} {x.budget}** ({arch_summary(self.run.space, x.arch)})")
            self.add("table", headers=["file", "KiB", "resident weights KiB", "batch 1 ms", "batch 32 ms",
                                       "x FP32 (1 / 32)"], rows=table, align=["l", "r", "r", "r", "r", "r"])

    def baseline_section(self) -> None:
        b = self.baseline
        if b is None:
            return
        space, cmp = self.run.space, self.cmp
        self.add("h2", "Baseline comparison")
        rows = [[f"baseline {b.name} (trained alone)", arch_summary(space, b.arch), bits_label(b.arch["bits"]),
                 si(b.costs["macs"]), si(b.costs["bitops"]), f"{b.epochs:.2f}", pct(b.holdout_top1), pct(b.test_top1)]]
        if cmp:
            o: ChosenSubnet = cmp["oqat"]
            rows.append([f"OQAT best {cmp['bits']}-bit subnet at ≤ the baseline's BitOPs", arch_summary(space, o.arch),
                         bits_label(cmp["bits"]), si(o.costs["macs"]), si(o.costs["bitops"]),
                         f"{cmp['oqat_epochs']:.2f}" if cmp["oqat_epochs"] is not None else "–", pct(o.holdout_top1),
                         pct(o.test_top1)])
        self.add("table", headers=["network", "arch", "bits", "MACs", "BitOPs", "epochs", "held-out top-1", "test top-1"],
                 rows=rows, align=["w", "l", "l", "r", "r", "r", "r", "r"])
        same = self.run.markers["baseline"].get("spec", {}).get("schedule") != "explicit"
        text = (f"The baseline is the fixed subnet named in the config (`stages.baseline.arch`, chosen before any "
                f"search), trained on its own with LSQ at {b.arch['bits']} bit on the labels for {b.epochs:.2f} epochs"
                + (", the same number of training images as all OQAT training stages together (the epochs column of "
                   "the OQAT row). " if same else ". ")
                + "The OQAT subnet is the best one the search found under a BitOPs budget equal to the baseline's; "
                  "both are measured the same way (BN re-calibration on held-out images).")
        if cmp:
            text += f" Difference on the test split: **{cmp['oqat'].test_top1 - b.test_top1:+.2f} points** for OQAT."
        self.add("p", text)

    def curves(self) -> None:
        run = self.run
        curves = {s.name: read_curve(run.out / s.name / "metrics.jsonl") for s in run.stages
                  if s.kind in ("fp", "train", "baseline") and s.name in run.markers}
        name = f"{FILES}/training.png"
        if training_figure(run.out / name, curves):
            self.add("h2", "Training curves")
            self.add("img", "training loss of the largest subnet (baseline: its only network), per stage", path=name)

    def configuration(self) -> None:
        self.add("h2", "Configuration")
        self.add("p", "The resolved configuration (also in `config.yaml`); each stage's own settings and results are "
                      "in `<stage>/stage.json`.")
        self.add("pre", yaml.safe_dump(self.run.config, sort_keys=False, width=110, default_flow_style=None))


def build_blocks(run: RunSummary) -> list[Block]:
    return _Report(run).build()


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md and RUN/report.html from the run folder; returns the Markdown path."""
    run = RunSummary.load(run_dir)
    blocks = build_blocks(run)
    md = run.out / "report.md"
    md.write_text(render_md(blocks))
    (run.out / "report.html").write_text(render_html(blocks, run.out, f"OQAT run {run.name}"))
    return md


__all__ = ["arch_summary", "bits_label", "build_blocks", "write_report"]
