#!/usr/bin/env python
"""The figures behind docs/interop.md: how equal the converted supernets are, and how far a wrong
map moves the logits. Uses the networks and references of tests/test_interop.py (the ``ofa``
package's OFAMobileNetV3 with random tensors; OQA's formula on it), so the two always agree.

    python benchmarks/bench_interop.py          # about a minute on one CPU thread
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_interop as T  # noqa: E402

from oqat.interop import from_ofa, from_oqa  # noqa: E402
from oqat.interop import ofa as ofa_mod  # noqa: E402
from oqat.space import SearchSpace  # noqa: E402


def main() -> int:
    torch.set_grad_enabled(False)
    space = SearchSpace.preset("mbv3-imagenet")
    print("OFA -> oqat, max |logit difference| per subnet (batch 2, eval mode)")
    for width, name, n_random in ((1.0, "mbv3-imagenet", 8), (1.2, "mbv3-imagenet-w1.2", 2)):
        net = T._ofa_net(width, seed=0 if width == 1.0 else 3)
        sp = SearchSpace.preset(name)
        diffs = []
        for i, arch in enumerate(T._archs(sp, n_random, seed=0 if width == 1.0 else 1)):
            T._calibrate(net, arch, i)
            diffs.append(T._logit_diff(net, T._from_ofa(net), arch, i))
        print(f"  w{width}: {len(diffs)} subnets, max {max(diffs):.2e}, per subnet "
              + " ".join(f"{d:.1e}" for d in diffs))

    print("OQA -> oqat, layer by layer and logits")
    net = T._ofa_net(1.0, seed=20)
    for bits in (4, 3, 2):
        codes = total = 0
        worst = 0.0
        for i, arch in enumerate(T._archs(space, 2, seed=bits)):
            sd, ref = T._oqa_case(net, bits, arch, seed=i)
            oqat_net = T._oqat_net(from_oqa(sd, bits))
            inputs = []
            handles = [m.act_quant.register_forward_hook(lambda mod, a, out: inputs.append(out))
                       for m in oqat_net.modules() if getattr(m, "act_quant", None) is not None]
            worst = max(worst, T._compare_oqa(ref, oqat_net, arch, seed=i))
            for h in handles:
                h.remove()
            codes += sum(int((a != b).sum()) for a, b in zip(ref.inputs, inputs))
            total += sum(a.numel() for a in ref.inputs)
        print(f"  {bits} bit: 4 subnets, quantized inputs differing {codes} of {total}, max |logit difference| {worst:.2e}")

    print("what a wrong conversion does (max |logit difference|, largest subnet with k=3 or k=5)")
    net = T._ofa_net(1.0)
    arch3 = T._all_kernels(space, 3)
    T._calibrate(net, arch3)
    for a, b in (("blocks.5.expand.bn.weight", "blocks.5.expand.bn.bias"),
                 ("blocks.1.project.weight", "blocks.2.project.weight"),
                 ("blocks.9.depthwise.kernel_transforms.5to3", "blocks.10.depthwise.kernel_transforms.5to3")):
        original = ofa_mod.key_pairs
        ofa_mod.key_pairs = T._swapped(a, b)
        try:
            print(f"  {a} <-> {b}: {T._logit_diff(net, T._from_ofa(net), arch3):.3f}")
        finally:
            ofa_mod.key_pairs = original
    for k in (3, 5):
        arch = T._all_kernels(space, k, r=128)
        T._calibrate(net, arch)
        for wrong in ("transposed", "shared"):
            imported = from_ofa(net.state_dict())
            for key in [x for x in imported.model if ".kernel_transforms." in x]:
                imported.model[key] = imported.model[key].t() if wrong == "transposed" else \
                    imported.model["blocks.0.depthwise.kernel_transforms." + key.rsplit(".", 1)[1]]
            print(f"  kernel transforms {wrong}, k={k}: {T._logit_diff(net, T._oqat_net(imported), arch):.3f}")
    arch = space.largest().replace(r=128)
    sd, ref = T._oqa_case(T._ofa_net(1.0, seed=20), 4, arch)
    signed = T._oqat_net(from_oqa(sd, 4), unsigned=False)
    signed.set_arch(arch.replace(bits=4))
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    T._set_subnet(ref.net, arch)
    print(f"  OQA converted with signed activations (4 bit): {(ref.net(x) - signed(x)).abs().max().item():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
