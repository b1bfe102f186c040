"""What an export is verified on: labelled held-out images of the checkpoint's data, or seeded
random inputs (no labels) where there is no data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import data as D


# ---------------------------------------------------------------------------------- inputs
@dataclass
class VerificationData:
    """Images to verify an export on, with labels where they are real data (the task check)."""

    images: torch.Tensor                  # (N, C, r, r) at the subnet's resolution
    labels: torch.Tensor | None
    description: str
    class_names: tuple[str, ...] | None = None



def verification_inputs(config: dict | None, space, resolution: int, n: int, seed: int = 0
                        ) -> tuple[VerificationData, str | None]:
    """(verification data, note or None).

    `n` labelled held-out images (``oqat.data``) when ``config["data"]`` is there and loadable,
    resized to ``resolution``; otherwise seeded standard-normal inputs without labels, with a
    note saying why.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"verify images: expected a positive integer, got {n!r}")
    data_cfg = (config or {}).get("data") if isinstance(config, dict) else None
    if data_cfg:
        try:
            cfg = D.DataConfig.from_dict(dict(data_cfg))
            data = D.build_data(cfg)
            if data.in_channels != space.in_channels:
                raise ValueError(f"data has {data.in_channels} channels but the model takes {space.in_channels}")
            if len(data.holdout) == 0:
                raise ValueError("the held-out split is empty (data.holdout = 0)")
            subset = D.calibration_subset(data.holdout, n, seed)
            items = [subset[i] for i in range(len(subset))]
            images = D.resize_batch(torch.stack([x for x, _ in items]).float(), resolution)
            labels = torch.tensor([int(y) for _, y in items])
            desc = f"{len(subset)} held-out images of {cfg.name} at {resolution} px"
            if len(subset) < n:
                desc += f" (the held-out split has only {len(subset)})"
            return VerificationData(images, labels, desc, tuple(data.classes) or None), None
        except (ValueError, OSError, RuntimeError) as exc:
            note = f"held-out data not available ({exc})"
    else:
        note = "the checkpoint has no data config"
    return random_inputs(space, resolution, n, seed, note), note



def random_inputs(space, resolution: int, n: int, seed: int, reason: str) -> VerificationData:
    """`n` seeded standard-normal inputs (no labels); `reason` says why no real images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, space.in_channels, resolution, resolution, generator=g)
    return VerificationData(images, None, f"{n} random standard-normal inputs ({reason})")


__all__ = ["VerificationData", "random_inputs", "verification_inputs"]
