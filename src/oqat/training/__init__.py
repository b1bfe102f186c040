"""Joint training of quantized supernets (the sandwich rule) and bit inheritance (method.md s. 3-4)."""

from .config import ModelConfig, TrainConfig, TrainRunConfig, load_train_config
from .inherit import DEFAULT_FACTOR, inherit_bits, inherit_checkpoint
from .loop import TrainingDiverged, TrainResult, soft_cross_entropy, train
from .schedule import GlobalBatchSampler, lr_factor, step_archs

__all__ = ["DEFAULT_FACTOR", "GlobalBatchSampler", "ModelConfig", "TrainConfig", "TrainResult", "TrainRunConfig",
           "TrainingDiverged", "inherit_bits", "inherit_checkpoint", "load_train_config", "lr_factor",
           "soft_cross_entropy", "step_archs", "train"]
