"""Hostile and careless input, probe by probe: every one ends in one line naming the path or
key, exit status 2, nothing lost and nothing written through a planted link."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from oqat import Arch, SearchSpace, build_supernet
from oqat.cli import main
from oqat.models import Checkpoint
from oqat.pipeline.markers import MARKER
from oqat.utils.files import folder_lock

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"name": "ci-tiny", "stem_channels": 8, "stem_stride": 1, "first_block_channels": 8,
         "stages": [{"width": 8, "stride": 2, "act": "relu", "se": False},
                    {"width": 16, "stride": 2, "act": "h_swish", "se": True}],
         "max_depth": 2, "depth_choices": [1, 2], "kernel_choices": [3, 5], "expand_choices": [2, 3],
         "resolutions": [12, 16], "final_expand_channels": 32, "feature_mix_channels": 48, "num_classes": 4}
DATA = {"name": "synthetic", "image_size": 16, "synthetic_size": 96, "synthetic_classes": 4, "holdout": 32}


def run(capsys, *argv) -> tuple[int, str]:
    """(exit status, stderr) of ``oqat ARGV`` in this process; stderr must be one line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1, err
    return rc, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small 4-bit supernet checkpoint whose quantizers have seen data."""
    space = SearchSpace.from_dict(SPACE)
    net = build_supernet(space, 4)
    net.train()
    with torch.no_grad():
        net.set_arch(space.largest(4))
        net(torch.randn(4, 3, 16, 16))
    path = tmp_path_factory.mktemp("probe") / "c4.pt"
    Checkpoint(space=space, bits=4, model=net.state_dict(), config={"data": DATA, "model": {}}).save(path)
    return path


@pytest.fixture
def train_cfg(tmp_path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"space": SPACE, "bits": 4, "data": DATA,
                                    "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "eval_images": 0,
                                              "device": "cpu", "num_random": 0}}))
    return path


def _arch_file(tmp_path: Path) -> Path:
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(Arch(ks=[3, 3, 5, 5], e=[2, 2, 3, 3], d=[1, 2], r=16, bits=4).to_dict()))
    return path


# ------------------------------------------------------------------------- security
def test_symlinked_run_file_is_never_written_through(tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("mine")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").symlink_to(target)
    rc, err = run(capsys, "run", ROOT / "configs" / "ci-tiny.yaml", "--out", out)
    assert rc == 2 and "config.yaml" in err and "symbolic link" in err
    assert target.read_text() == "mine"


def test_yaml_alias_bomb_is_a_short_error(tmp_path, capsys):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    rc, err = run(capsys, "run", bomb, "--dry-run")
    assert rc == 2 and "bomb.yaml" in err and "aliases" in err and len(err) < 300


def test_checkpoint_metadata_asking_for_millions_of_channels(tmp_path, ckpt, capsys):
    data = torch.load(ckpt, weights_only=True)
    data["space"]["stem_channels"] = 3_000_000
    bad = tmp_path / "huge.pt"
    torch.save(data, bad)
    rc, err = run(capsys, "eval", "--ckpt", bad, "--largest")
    assert rc == 2 and "huge.pt" in err and "stem_channels" in err


def test_oqat_file_metadata_asking_for_millions_of_classes(tmp_path, ckpt, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "m.oqat"
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path)), "--format", "oqat",
                 "-o", str(good), "--verify-images", "4"]) == 0
    capsys.readouterr()
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["oqat"])
    info["space"]["num_classes"] = 50_000_000
    bad = tmp_path / "bad.oqat"
    save_file(tensors, str(bad), metadata={**meta, "oqat": json.dumps(info)})
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(image)
    rc, err = run(capsys, "predict", bad, image)
    assert rc == 2 and "num_classes" in err


def test_decompression_bomb_image(tmp_path, ckpt, capsys):
    from PIL import Image

    model = tmp_path / "m.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path)), "-o", str(model),
                 "--verify-images", "4"]) == 0
    capsys.readouterr()
    big = tmp_path / "big.png"
    Image.new("L", (9000, 9000)).save(big)   # 81 megapixels in a few hundred KB
    rc, err = run(capsys, "predict", model, big)
    assert rc == 2 and "big.png" in err and "megapixels" in err


def test_pickled_code_checkpoint_is_refused_without_unsafe_advice(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "code-ran"),))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "oqat-checkpoint", "x": Payload()}, bad)
    rc, err = run(capsys, "eval", "--ckpt", bad, "--largest")
    assert rc == 2 and "evil.pt" in err and "refused" in err and "weights_only" not in err
    assert not (tmp_path / "code-ran").exists()


def test_a_plain_pickle_is_one_line_without_torch_warnings(tmp_path, capsys):
    import pickle
    import warnings

    bad = tmp_path / "plain.pt"
    bad.write_bytes(pickle.dumps({"a": 1}, protocol=4))   # not torch's zip format, no code either
    with warnings.catch_warnings(record=True) as shown:      # what a user's terminal would print
        warnings.simplefilter("always")
        rc, err = run(capsys, "eval", "--ckpt", bad, "--largest")
    assert rc == 2 and "plain.pt: not a readable checkpoint" in err
    assert not [w for w in shown if "pickle" in str(w.message)], [str(w.message) for w in shown]


# ------------------------------------------------------------------------- data loss
def test_run_into_an_existing_folder_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "export").mkdir(parents=True)
    (out / "export" / "important_results.txt").write_text("keep me")
    raw = yaml.safe_load((ROOT / "configs" / "ci-tiny.yaml").read_text())
    raw["stages"]["fp"]["enabled"] = False
    raw["stages"]["inherit"]["targets"] = []
    raw["stages"]["baseline"]["enabled"] = False
    raw["stages"]["search"]["generations"] = 0
    raw["stages"]["export"].update(formats=["onnx"], latency=False)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert (out / "export" / "important_results.txt").read_text() == "keep me"
    assert "oqat did not write (important_results.txt); left alone" in capsys.readouterr().out
    # recomputing the export stage removes only what the export wrote
    assert main(["run", str(cfg), "--out", str(out), "--no-progress", "--redo-changed",
                 "--set", "stages.export.verify_images=6"]) == 0
    assert (out / "export" / "important_results.txt").read_text() == "keep me"
    # a damaged marker of a finished stage: reported, the trained supernet kept
    marker = out / "supernet-4bit" / MARKER
    marker.write_text(marker.read_text()[:40])
    final = out / "supernet-4bit" / "final.pt"
    before = final.stat().st_mtime_ns
    rc, err = run(capsys, "run", cfg, "--out", out, "--no-progress")
    assert rc == 2 and "supernet-4bit/stage.json is damaged" in err and "--redo-changed" in err
    assert final.stat().st_mtime_ns == before
    # a second invocation on the same folder is refused, naming the holder
    with folder_lock(out):
        rc, err = run(capsys, "run", cfg, "--out", out, "--no-progress", "--redo-changed")
    assert rc == 2 and "in use by another oqat process" in err and f"pid {os.getpid()}" in err


def test_train_into_a_used_folder_needs_resume_or_overwrite(tmp_path, train_cfg, capsys):
    out = tmp_path / "t"
    assert main(["train", str(train_cfg), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    rc, err = run(capsys, "train", train_cfg, "--out", out, "--no-progress")
    assert rc == 2 and "already holds a training run" in err and "--overwrite" in err
    with folder_lock(out, "training folder"):
        rc, err = run(capsys, "train", train_cfg, "--out", out, "--no-progress", "--resume")
    assert rc == 2 and "training folder is in use by another oqat process" in err
    notes = out / "notes.txt"
    notes.write_text("mine")
    assert main(["train", str(train_cfg), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert notes.read_text() == "mine"
    # --resume from a final checkpoint copied over last.pt
    (out / "checkpoints" / "last.pt").write_bytes((out / "final.pt").read_bytes())
    capsys.readouterr()
    rc, err = run(capsys, "train", train_cfg, "--out", out, "--resume", "--no-progress")
    assert rc == 2 and "last.pt" in err and "no optimizer" in err


def test_non_finite_checkpoints_are_refused_everywhere(tmp_path, ckpt, capsys):
    data = torch.load(ckpt, weights_only=True)
    key = next(k for k in data["model"] if k.endswith("weight"))
    data["model"][key] = torch.full_like(data["model"][key], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(data, bad)
    arch = _arch_file(tmp_path)
    for argv in (["eval", "--ckpt", bad, "--largest"],
                 ["search", "--ckpt", bad, "--budget", "macs=1G", "--out", tmp_path / "s"],
                 ["inherit", bad, "--bits", "3", "-o", tmp_path / "i.pt"],
                 ["export", "--ckpt", bad, "--arch", arch, "-o", tmp_path / "x.onnx"]):
        rc, err = run(capsys, *argv)
        assert rc == 2 and "nan.pt" in err and "NaN or infinity" in err and key in err, argv


# ------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize("override, key", [
    ("train.lr=.nan", "train.lr: expected a finite number"),
    ("train.max_steps=-5", "train.max_steps: must be >= 1"),
    ("train.weight_decay=-1", "train.weight_decay: must be >= 0"),
    ("train.momentum=1.5", "train.momentum: must be in [0, 1)"),
    ("train.device=tpu", "train.device: 'tpu' is not a torch device"),
    ("train.lr=[1", "--set 'train.lr=[1': invalid YAML"),
])
def test_bad_training_values_name_the_key(train_cfg, tmp_path, capsys, override, key):
    rc, err = run(capsys, "train", train_cfg, "--out", tmp_path / "t", "--set", override, "--no-progress")
    assert rc == 2 and key in err


def test_exponent_without_a_dot_is_a_number(tmp_path, capsys):
    rc = main(["run", str(ROOT / "configs" / "ci-tiny.yaml"), "--out", str(tmp_path / "r"), "--dry-run",
               "--set", "train.lr=1e-3"])
    assert rc == 0 and "lr 0.001" in capsys.readouterr().out


def test_inherit_factor_must_be_finite(ckpt, tmp_path, capsys):
    rc, err = run(capsys, "inherit", ckpt, "--bits", "3", "--factor", "inf", "-o", tmp_path / "i.pt")
    assert rc == 2 and "factor" in err and not (tmp_path / "i.pt").exists()


# ------------------------------------------------------------------------- paths and files
def test_output_paths(tmp_path, ckpt, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    arch = _arch_file(tmp_path)
    rc, err = run(capsys, "search", "--ckpt", ckpt, "--budget", "macs=1G", "--out", a_file / "sub")
    assert rc == 2 and "a-file" in err and "is a file" in err
    rc, err = run(capsys, "run", ROOT / "configs" / "ci-tiny.yaml", "--out", a_file)
    assert rc == 2 and "is a file, not a folder" in err
    rc, err = run(capsys, "export", "--ckpt", ckpt, "--arch", arch, "-o", tmp_path)
    assert rc == 2 and "is a folder; give a file name" in err


def test_input_paths_that_are_folders(tmp_path, ckpt, capsys):
    rc, err = run(capsys, "run", tmp_path, "--dry-run")
    assert rc == 2 and "is a folder, not a config file" in err
    rc, err = run(capsys, "eval", "--ckpt", ckpt, "--arch", tmp_path)
    assert rc == 2 and "is a folder, not an arch file" in err
    rc, err = run(capsys, "cost", "--space", tmp_path / "spaces.yaml", "--largest")
    assert rc == 2 and "search-space file not found" in err
    (tmp_path / "d.yaml").mkdir()
    rc, err = run(capsys, "cost", "--space", tmp_path / "d.yaml", "--largest")
    assert rc == 2 and "is a folder" in err


def test_space_files_with_bad_syntax_or_types(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nstages: [\n")
    rc, err = run(capsys, "cost", "--space", broken, "--largest")
    assert rc == 2 and "broken.yaml: invalid YAML" in err and "line" in err
    for change, key in ((("stem_channels", "8"), "stem_channels: expected an integer"),
                        (("stages", [{**SPACE["stages"][0], "width": [8]}]), "stages[0].width: expected an integer"),
                        (("stages", [{**SPACE["stages"][0], "width": "eight"}]), "stages[0].width")):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**SPACE, change[0]: change[1]}))
        rc, err = run(capsys, "cost", "--space", path, "--largest")
        assert rc == 2 and key in err, (change, err)


def test_file_size_limit_while_writing(tmp_path, ckpt):
    """An export that hits the file-size limit: one line naming the file, status 2."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [sys.executable, "-m", "oqat", "export", "--ckpt", str(ckpt), "--arch", str(_arch_file(tmp_path)),
           "-o", str(tmp_path / "m.onnx"), "--no-verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "File too large" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_threads_and_eval_images(ckpt, capsys):
    rc, err = run(capsys, "eval", "--ckpt", ckpt, "--largest", "--threads", "-1")
    assert rc == 2 and "--threads: expected a positive integer" in err
    rc, err = run(capsys, "eval", "--ckpt", ckpt, "--largest", "--eval-images", "0")
    assert rc == 2 and "--eval-images" in err


def test_init_of_another_space_says_what_differs(tmp_path, ckpt, train_cfg, capsys):
    raw = yaml.safe_load(train_cfg.read_text())
    raw["data"]["synthetic_classes"] = 6
    cfg = tmp_path / "six.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc, err = run(capsys, "train", cfg, "--out", tmp_path / "t", "--init", ckpt, "--no-progress")
    assert rc == 2 and "num_classes 4 vs 6" in err


def test_corrupt_image_in_a_worker_is_one_line(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(10):
                Image.new("RGB", (16, 16), (40 * c, 10 * i, 0)).save(folder / f"{i}.png")
    (root / "train" / "c0" / "3.png").write_bytes(b"not an image at all")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(yaml.safe_dump({"space": SPACE, "bits": 4,
                                   "data": {"name": "imagefolder", "root": str(root), "image_size": 16, "holdout": 4,
                                            "workers": 1},
                                   "train": {"epochs": 1, "batch_size": 16, "eval_images": 0, "device": "cpu"}}))
    rc, err = run(capsys, "train", cfg, "--out", tmp_path / "t", "--no-progress")
    assert rc == 2 and "3.png" in err and "Traceback" not in err


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import oqat.cli.commands.cost as verb

    def boom(args):
        raise TypeError("something nobody expected")

    monkeypatch.setattr(verb, "run", boom)
    rc, err = run(capsys, "cost", "--largest")
    assert rc == 1 and "unexpected error" in err and "--debug" in err
    with pytest.raises(TypeError):
        main(["--debug", "cost", "--largest"])
