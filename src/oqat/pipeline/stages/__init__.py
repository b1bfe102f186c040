"""One module per stage kind; each exposes ``run(ctx, stage, folder, resumed) -> outcome``."""

from . import baseline, export, search, train

RUNNERS = {"fp": train.run, "train": train.run, "search": search.run, "baseline": baseline.run, "export": export.run}

__all__ = ["RUNNERS"]
