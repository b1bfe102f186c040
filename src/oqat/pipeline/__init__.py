"""The whole OQAT method from one YAML config: ``oqat run CONFIG`` (see docs/pipeline.md).

Stages, each writing into ``RUN/<stage>/``:

``fp``                optional full-precision supernet (``oqat.training`` at 32 bit)
``supernet-<b>bit``   the first quantized supernet (from ``fp``, a checkpoint, or scratch)
``supernet-<b>bit``   every inheritance target (3, 2): bit inheritance, then fine-tuning
``search-<b>bit``     evolutionary search under the budgets at each bit-width, plus held-out and
                      test accuracy of the largest, smallest and chosen subnets
``baseline``          a fixed hand-designed subnet trained alone with LSQ (the paper's comparison)
``export``            the chosen subnets as verified files, scored on the test split, with latency

and the report (``report.md`` / ``report.html``), rebuilt on every run from the folder.
:mod:`.config` reads and validates the YAML, :mod:`.plan` turns it into typed stages,
:mod:`.runner` runs them, :mod:`.stages` holds one module per stage kind, :mod:`.results` the
typed records they write, :mod:`.summary` reads a run folder back, :mod:`.report` renders it.
"""

from .config import RunConfig, config_from_dict, default_out, load_run_config, run_space
from .markers import StageMismatch, read_marker
from .report import write_report
from .runner import Pipeline, RunResult, run_pipeline
from .summary import RunSummary

__all__ = ["Pipeline", "RunConfig", "RunResult", "RunSummary", "StageMismatch", "config_from_dict", "default_out",
           "load_run_config", "read_marker", "run_pipeline", "run_space", "write_report"]
