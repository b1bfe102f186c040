"""`oqat cost` in-process: the OQA README figures, JSON output, and one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from oqat.cli import main
from oqat.space import cost


def _flags(f: dict, **changes) -> list[str]:
    f = {**f, **changes}
    out = []
    for key in ("ks", "expand", "depth", "resolution", "bits"):
        if f.get(key) is not None:
            out += [f"--{key}", str(f[key])]
    return out


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("oqat cost: error: ")
    return lines[0]


def test_oqa_flags_print_reference_figures(capsys, oqa_flags):
    assert main(["cost", *_flags(oqa_flags, bits=4)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines["MACs"].split()[1] == "55.385"
    assert lines["params"].split()[1] == "4.230"
    assert lines["OQA-FLOPs"].split()[1] == "16.638"
    assert "bits=4" in lines["BitOPs"]
    assert lines["resolution"].split()[1] == "128"
    assert out.startswith("space mbv3-imagenet")


def test_json_output_parses_and_matches_cost_module(capsys, oqa_flags, oqa_arch, imagenet_space):
    assert main(["cost", *_flags(oqa_flags, bits=4), "--json", "--layers"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["space"] == "mbv3-imagenet"
    assert data["arch"] == oqa_arch.to_dict()
    assert data["macs"] == cost.macs(imagenet_space, oqa_arch)
    assert round(data["macs"] / 1e6, 3) == 55.385
    assert data["bitops"] == cost.bitops(imagenet_space, oqa_arch)
    assert data["oqa_flops"] == pytest.approx(cost.oqa_flops(imagenet_space, oqa_arch))
    assert data["size_bits"] == cost.size_bits(imagenet_space, oqa_arch)
    assert sum(layer["macs"] for layer in data["layers"]) == data["macs"]
    assert data["layers"][0]["name"] == "stem" and data["layers"][0]["quantized"] is False


def test_arch_file_and_special_subnets(capsys, tmp_path, oqa_arch, imagenet_space, tiny_space):
    path = tmp_path / "arch.json"
    oqa_arch.save(path)
    assert main(["cost", "--arch", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == cost.macs(imagenet_space, oqa_arch)
    # --bits / --resolution override the file's values
    assert main(["cost", "--arch", str(path), "--bits", "2", "--resolution", "160", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["bits"], data["resolution"]) == (2, 160)
    assert data["macs"] == cost.macs(imagenet_space, oqa_arch.replace(bits=2, r=160))
    assert main(["cost", "--largest", "--json"]) == 0
    assert round(json.loads(capsys.readouterr().out)["macs"] / 1e6, 1) == 566.2
    assert main(["cost", "--smallest", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert round(data["macs"] / 1e6, 1) == 41.5 and data["bits"] == 32
    assert main(["cost", "--space", "mbv3-tiny", "--smallest", "--resolution", "28", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["space"] == "mbv3-tiny"
    assert data["macs"] == cost.macs(tiny_space, tiny_space.smallest().replace(r=28))


@pytest.mark.parametrize("changes,pattern", [
    ({"ks": "4" + ",3" * 19}, r"ks\[0\]: 4 is not one of"),
    ({"expand": "3,5" + ",3" * 18}, r"e\[1\]: 5 is not one of"),
    ({"depth": "2,2,5,2,3"}, r"d\[2\]: 5 is not one of"),
    ({"depth": "2,2,3,2"}, r"d: expected 5 entries.*got 4"),
    ({"ks": "3,3,5"}, r"ks: expected 20 entries.*got 3"),
    ({"resolution": 130}, r"r: 130 is not an allowed resolution"),
    ({"resolution": 300}, r"r: 300 is not an allowed resolution"),
    ({"bits": 9}, r"bits: 9 is not supported"),
    ({"ks": "3,x,5"}, r"--ks: expected comma-separated integers, got '3,x,5'"),
    ({"depth": None}, r"--ks, --expand, --depth and --resolution are all required"),
])
def test_bad_flags_give_one_line_errors(capsys, oqa_flags, changes, pattern):
    import re

    line = _error_line(capsys, ["cost", *_flags(oqa_flags, **changes)])
    assert re.search(pattern, line), line


def test_bad_files_and_conflicting_choices(capsys, tmp_path, oqa_flags):
    line = _error_line(capsys, ["cost", "--arch", str(tmp_path / "missing.json")])
    assert "missing.json" in line
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ks": [3] * 20, "e": [3] * 20, "d": [2] * 5, "r": 128, "depht": 1}))
    line = _error_line(capsys, ["cost", "--arch", str(bad)])
    assert "bad.json" in line and "'depht'" in line
    outside = tmp_path / "outside.json"  # well formed, but not a subnet of the space
    outside.write_text(json.dumps({"ks": [3] * 20, "e": [3] * 20, "d": [2] * 5, "r": 130}))
    line = _error_line(capsys, ["cost", "--arch", str(outside)])
    assert "outside.json: r: 130 is not an allowed resolution" in line and "mbv3-imagenet" in line
    line = _error_line(capsys, ["cost", "--largest", *_flags(oqa_flags)])
    assert "exactly one of" in line
    line = _error_line(capsys, ["cost", "--space", "no-such-space", "--largest"])
    assert "'no-such-space'" in line


def test_argparse_errors_exit_2_and_name_the_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cost", "--largest", "--resolution", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "oqat cost: error: argument --resolution: invalid int value: 'abc'"
