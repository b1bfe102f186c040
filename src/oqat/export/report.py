"""What a verification found: per-tensor code comparisons, the figures and the verdict thresholds
(:class:`VerifyReport`), and the error a failed export raises with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIN_TOP1 = 0.999       # end-to-end top-1 agreement with the PyTorch subnet
MAX_CODE_SHARE = 0.001  # share of a tensor's codes that may differ ...
MAX_CODE_DIFF = 1       # ... by at most this many steps
MAX_TOP1_GAP = 0.2      # points of top-1 on labelled images, exported file vs PyTorch subnet


class VerificationError(ValueError):
    """An exported model does not compute what the PyTorch subnet computes."""

    def __init__(self, message: str, report: "VerifyReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class TensorCheck:
    """Code comparison of one quantized tensor (``count`` codes per comparison)."""

    name: str             # quantizer module path
    kind: str             # "weight" or "activation"
    bits: int
    signed: bool
    count: int = 0        # codes compared
    differing: int = 0    # aligned comparison: codes that differ
    max_diff: int = 0     # aligned comparison: largest |code difference|
    e2e_differing: int = 0
    e2e_max_diff: int = 0

    @property
    def share(self) -> float:
        return self.differing / self.count if self.count else 0.0

    @property
    def e2e_share(self) -> float:
        return self.e2e_differing / self.count if self.count else 0.0


class AgreementFigures:
    """The verdict and top-1 figures of any engine's check, from its counters (``images``,
    ``top1_agree``, ``labelled``, ``reference_correct``, ``exported_correct``, ``failures``)."""

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.images if self.images else 1.0

    @property
    def reference_top1(self) -> float | None:
        """Top-1 (percent) of the PyTorch subnet on the labelled images, None without labels."""
        return 100.0 * self.reference_correct / self.labelled if self.labelled else None

    @property
    def exported_top1(self) -> float | None:
        """Top-1 (percent) of the exported model on the labelled images, None without labels."""
        return 100.0 * self.exported_correct / self.labelled if self.labelled else None


@dataclass
class VerifyReport(AgreementFigures):
    """Figures of one verification run; ``failures`` is empty when it passed."""

    target: str                      # "onnxruntime" or "packed"
    images: int
    inputs: str                      # where the inputs came from
    max_abs_diff: float = 0.0        # end to end
    aligned_max_abs_diff: float = 0.0
    max_abs_logit: float = 0.0
    top1_agree: int = 0
    labelled: int = 0                # images with labels (the task-level check)
    reference_correct: int = 0       # of those, classified correctly by the PyTorch subnet
    exported_correct: int = 0        # ... and by the exported model
    tensors: list[TensorCheck] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    graph: dict | None = None        # integer files: node counts of onnxruntime's optimized graph

    @property
    def codes_compared(self) -> int:
        return sum(t.count for t in self.tensors)

    @property
    def codes_differing(self) -> int:
        return sum(t.differing for t in self.tensors)

    @property
    def e2e_codes_differing(self) -> int:
        return sum(t.e2e_differing for t in self.tensors)

    @property
    def max_code_diff(self) -> int:
        return max((t.max_diff for t in self.tensors), default=0)

    @property
    def e2e_max_code_diff(self) -> int:
        return max((t.e2e_max_diff for t in self.tensors), default=0)

    def worst(self) -> TensorCheck | None:
        return max(self.tensors, key=lambda t: (t.share, t.max_diff), default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, top1_agreement=self.top1_agreement, reference_top1=self.reference_top1,
                 exported_top1=self.exported_top1, codes_compared=self.codes_compared,
                 codes_differing=self.codes_differing, max_code_diff=self.max_code_diff,
                 e2e_codes_differing=self.e2e_codes_differing, e2e_max_code_diff=self.e2e_max_code_diff)
        for t, row in zip(self.tensors, d["tensors"]):
            row.update(share=t.share, e2e_share=t.e2e_share)
        return d

    def summary(self) -> str:
        """A few lines: the headline figures and the verdict."""
        lines = [f"verification ({self.target}) on {self.images} inputs: {self.inputs}"]
        if self.graph:
            g = self.graph
            lines.append(f"  optimized graph: {g['int_convs']} integer conv nodes for {g['expected_int']} quantized convs, "
                         f"{g['float_convs']} float convs (full-precision layers: {g['allowed_float']})")
        lines.append(f"  max |logit difference| {self.max_abs_diff:.3g} (largest |logit| {self.max_abs_logit:.3g}); "
                     f"top-1 agreement {100 * self.top1_agreement:.2f}% ({self.top1_agree}/{self.images})")
        if self.labelled:
            lines.append(f"  top-1 on the {self.labelled} labelled images: exported {self.exported_top1:.2f}%, "
                         f"PyTorch subnet {self.reference_top1:.2f}%")
        if self.tensors:
            n = self.codes_compared
            w = self.worst()
            lines.append(f"  integer codes, {len(self.tensors)} quantized tensors, {n} codes: "
                         f"aligned {self.codes_differing} differ ({100 * self.codes_differing / max(n, 1):.4f}%, "
                         f"largest difference {self.max_code_diff}, worst tensor {w.name} {100 * w.share:.4f}%); "
                         f"end to end {self.e2e_codes_differing} differ "
                         f"({100 * self.e2e_codes_differing / max(n, 1):.4f}%, largest difference {self.e2e_max_code_diff})")
        else:
            lines.append("  no quantized tensors (full precision)")
        lines.append("  PASSED" if self.ok else "  FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)

    def table(self) -> str:
        """Per-tensor rows: codes compared, aligned and end-to-end differing shares and largest differences."""
        rows = [f"  {'quantized tensor':40s} {'kind':10s} {'bits':>4s} {'codes':>10s} {'aligned':>9s} {'max':>3s}"
                f" {'e2e':>9s} {'max':>3s}"]
        for t in self.tensors:
            rows.append(f"  {t.name:40s} {t.kind:10s} {t.bits:4d} {t.count:10d} {100 * t.share:8.4f}% {t.max_diff:3d}"
                        f" {100 * t.e2e_share:8.4f}% {t.e2e_max_diff:3d}")
        return "\n".join(rows)


__all__ = ["MAX_CODE_DIFF", "MAX_CODE_SHARE", "MAX_TOP1_GAP", "MIN_TOP1", "AgreementFigures", "TensorCheck", "VerificationError", "VerifyReport"]
