"""benchmarks/bench_gpu.py runs on the CPU with small settings (what a GPU runs with the defaults)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    result = _bench().main(["--device", "cpu", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                            "--image-size", "32", "--workers", "0", "--jpeg-images", "8", "--jpeg-size", "40", "56",
                            "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    env = result["environment"]
    assert env["device"] == "cpu" and env["amp"] == "float32" and env["lsq_kernels"] in ("native", "compiled", "eager")
    assert result["settings"] == {"space": "mbv3-imagenet", "batch_size": 4, "image_size": 32, "bits": 4,
                                  "subnets_per_step": 4, "steps": 1, "warmup": 1}
    for key in ("sandwich", "subnet"):
        r = result[key]
        assert r["quantized_images_per_s"] > 0 and r["fp_images_per_s"] > 0
        assert abs(r["step_time_ratio"] - r["fp_images_per_s"] / r["quantized_images_per_s"]) < 1e-9
    assert result["loader"]["images"] == 8 - 1  # one held out
    assert result["loader"]["device_images_per_s"] > 0 and result["loader"]["cpu_dataloader_images_per_s"] > 0
    assert result["sandwich_loader"]["quantized_images_per_s"] > 0
