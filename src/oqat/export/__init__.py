"""Deployment of extracted subnets: ONNX in QCDQ form, onnxruntime verification, packed
low-bit weights and inference on image files. See docs/export.md."""

from .deploy import Deployable, ExportResult, deployable_from_checkpoint, export_subnet
from .deployment import DeploymentFiles, DeploymentRow, deployment_row, fp32_reference
from .meta import Preprocessing, model_info, preprocessing_for
from .onnx import build_onnx, export_onnx, read_onnx_info
from .onnx_int import build_onnx_int
from .packed import load_packed, pack_bits, read_packed_info, save_packed, unpack_bits
from .predict import ExportedModel, load_image, predict_files
from .verify import VerificationData, VerificationError, VerifyReport, verification_inputs, verify_models, verify_onnx
from .verify_int import verify_onnx_int

__all__ = ["Preprocessing", "model_info", "preprocessing_for", "build_onnx", "export_onnx", "read_onnx_info",
           "load_packed", "pack_bits", "read_packed_info", "save_packed", "unpack_bits", "Deployable", "ExportResult",
           "deployable_from_checkpoint", "export_subnet", "ExportedModel", "load_image", "predict_files", "VerificationData",
           "VerificationError", "VerifyReport", "verification_inputs", "verify_models", "verify_onnx",
           "build_onnx_int", "verify_onnx_int", "DeploymentFiles", "DeploymentRow", "deployment_row", "fp32_reference"]
