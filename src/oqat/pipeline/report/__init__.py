"""The run report: a document model (:mod:`.document`), figures (:mod:`.figures`) and the report
built from a run folder (:mod:`.build`)."""

from .build import arch_summary, bits_label, build_blocks, write_report

__all__ = ["arch_summary", "bits_label", "build_blocks", "write_report"]
