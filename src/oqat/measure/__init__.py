"""Measuring subnets: BN re-calibration, accuracy, the deployable subnet, latency (method.md s. 5)."""

from .calibrate import (
                        DEFAULT_CALIB_BATCH,
                        DEFAULT_CALIB_IMAGES,
                        CalibrationError,
                        bn_layers,
                        bn_state,
                        calibration_batches,
                        recalibrate_bn,
                        uninitialized_quantizers,
)
from .context import EvalContext, data_config_from_checkpoint, load_context
from .evaluate import DirectAccuracy, deployable_subnet, evaluate, load_batches, measure, prepare_subnet

__all__ = ["CalibrationError", "DEFAULT_CALIB_BATCH", "DEFAULT_CALIB_IMAGES", "DirectAccuracy", "EvalContext",
           "bn_layers", "bn_state", "calibration_batches", "data_config_from_checkpoint", "deployable_subnet",
           "evaluate", "load_batches", "load_context", "measure", "prepare_subnet", "recalibrate_bn",
           "uninitialized_quantizers"]
