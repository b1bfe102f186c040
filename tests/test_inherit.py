"""Bit inheritance: steps doubled per bit removed, everything else copied, nonsense refused."""

from __future__ import annotations

import pytest
import torch
from helpers import one_step_config, train_config

from oqat import SearchSpace, build_supernet, inherit_bits
from oqat.cli import main
from oqat.models import Checkpoint, CheckpointError, load_checkpoint, load_supernet
from oqat.training import inherit_checkpoint

SPACE = SearchSpace.preset("mbv3-tiny")


@pytest.fixture(scope="module")
def state4():
    torch.manual_seed(0)
    net = build_supernet(SPACE, 4).train()
    net(torch.randn(4, 3, 32, 32))  # initialises every step size from data
    return net.state_dict()


def test_steps_double_per_bit_removed(state4):
    s3 = inherit_bits(state4, 4, 3)
    s2 = inherit_bits(state4, 4, 2)
    steps = [k for k in state4 if k.endswith(".step")]
    assert len(steps) > 50
    for k in steps:
        assert torch.allclose(s3[k], 2 * state4[k])
        assert torch.allclose(s2[k], 4 * state4[k])
    assert torch.allclose(inherit_bits(state4, 4, 3, factor=1.5)[steps[0]], 1.5 * state4[steps[0]])
    for k in state4:
        if not k.endswith(".step"):
            assert torch.equal(s3[k], state4[k]), k
        assert s3[k].data_ptr() != state4[k].data_ptr(), "inherited tensors are copies"


def test_inheritance_keeps_the_clipping_range(state4):
    """With s_(b-1) = 2 s_b the largest signed code's value changes from (2^(b-1)-1)s to (2^(b-2)-1)2s."""
    net4 = build_supernet(SPACE, 4)
    net4.load_state_dict(state4)
    net3 = build_supernet(SPACE, 3)
    net3.load_state_dict(inherit_bits(state4, 4, 3))
    q4 = net4.blocks[0].expand.weight_quant
    q3 = net3.blocks[0].expand.weight_quant
    top4 = 7 * q4.effective_step().item()
    top3 = 3 * q3.effective_step().item()
    assert top3 == pytest.approx(top4 * 6 / 7, rel=1e-6)


@pytest.mark.parametrize("args, message", [
    ((4, 4), "must be lower"),
    ((3, 4), "must be lower"),
    ((4, 1), "to_bits: 1 is not supported"),
    ((32, 4), "not a quantized bit-width"),
])
def test_nonsense_is_refused(state4, args, message):
    with pytest.raises(ValueError, match=message):
        inherit_bits(state4, *args)


def test_uninitialised_source_is_refused():
    state = build_supernet(SPACE, 4).state_dict()
    with pytest.raises(ValueError, match="never initialised"):
        inherit_bits(state, 4, 3)
    with pytest.raises(ValueError, match="no '.step' entries"):
        inherit_bits({"w": torch.zeros(1)}, 4, 3)


def test_checkpoint_round_trip_and_train_init(tmp_path, state4):
    src = Checkpoint(space=SPACE, bits=4, model=state4, step=10, config={}).save(tmp_path / "b4.pt")
    out = inherit_checkpoint(src, 2, tmp_path / "b2.pt")
    ckpt = load_checkpoint(out)
    assert ckpt.bits == 2 and ckpt.step == 0 and ckpt.extra["inherited_from"]["bits"] == 4
    net, _ = load_supernet(out)
    assert net.bits == 2
    other = SPACE.replace(name="other", feature_mix_channels=256)
    with pytest.raises(CheckpointError, match="another space \\(name mbv3-tiny vs other"):
        inherit_checkpoint(src, 2, tmp_path / "x.pt", expect_space=other)

    cfg = one_step_config("mbv3-tiny", 2, out)
    trained = load_checkpoint(train_config(cfg, tmp_path / "run").checkpoint)
    key = "blocks.0.expand.weight_quant.step"
    # one SGD step later the inherited step (4x the 4-bit one) has moved only slightly
    assert trained.model[key].item() == pytest.approx(4 * state4[key].item(), rel=0.2)

    cfg["space"] = "mbv3-cifar"
    with pytest.raises(CheckpointError, match="differs from this run"):
        train_config(cfg, tmp_path / "run2")


def test_cli_reports_errors_in_one_line(tmp_path, state4, capsys):
    src = Checkpoint(space=SPACE, bits=4, model=state4).save(tmp_path / "b4.pt")
    assert main(["inherit", str(src), "--bits", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "must be lower" in err and "b4.pt" in err
    assert main(["inherit", str(src), "--bits", "3", "-o", str(tmp_path / "b3.pt")]) == 0
    assert load_checkpoint(tmp_path / "b3.pt").bits == 3
