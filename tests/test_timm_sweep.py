"""Breadth: one model per timm model module (the smallest that builds),
as a VBTimmBackbone with default options, at 256x320 and at an odd size
(both rounded up to the model's size_divisor when it states one). Every model
either gives outputs whose channels and sizes match its metadata, or is
refused with a clear ValueError/TypeError (at build, or at forward for a
size it cannot take); none fails with a bare exception.

Slow (about 4 minutes on 2 cores); `pytest -m slow tests/test_timm_sweep.py
-s` prints the counts.
"""
import math
from collections import Counter

import pytest
import timm
import torch

from vb_plugin import VBTimmBackbone


def smallest_model(module):
    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device('meta'):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 (not every entry builds bare)
            continue
        n = sum(p.numel() for p in model.parameters())
        if best is None or n < best[1]:
            best = (name, n)
    return best and best[0]


def sweep_one(name):
    try:
        model = VBTimmBackbone(name).eval()
    except (ValueError, TypeError) as err:
        return 'refused at build', str(err)
    div = model.size_divisor

    def up(n):
        return -(-n // div) * div

    # NOTE: both rounded up to the model's divisor (HaloNet's is 256): the
    # second is odd where the divisor allows, and differs from the first.
    sizes = [(up(256), up(320)), (up(225), up(301))]
    if sizes[1] == sizes[0]:
        sizes[1] = (up(225), up(301) + div)
    for h, w in sizes:
        try:
            with torch.no_grad():
                outs = model(torch.rand(1, 3, h, w))
        except ValueError as err:
            return 'refused at forward', str(err)
        for out, c, s in zip(outs, model.out_channels, model.out_strides):
            if out.shape[1] != c or out.shape[2] not in (
                    h // s, math.ceil(h / s)) or out.shape[3] not in (
                        w // s, math.ceil(w / s)):
                return 'metadata mismatch', f'{(h, w)}: {tuple(out.shape)}'
    if tuple(model.out_strides) == (4, 8, 16, 32):
        return 'pyramid 4..32', ''
    return 'other strides', str(model.out_strides)


@pytest.mark.slow
def test_one_model_per_timm_module():
    torch.set_num_threads(2)
    results = {}
    for module in sorted(timm.list_modules()):
        name = smallest_model(module)
        if name is None:
            continue
        # A bare exception fails the test here, naming the model.
        results[module] = (name, *sweep_one(name))
    counts = Counter(r[1] for r in results.values())
    print(f'\n{len(results)} timm modules: {dict(counts)}')
    for module, (name, status, msg) in sorted(results.items()):
        if status != 'pyramid 4..32':
            print(f'  {module} ({name}): {status}: {msg[:160]}')
    # timm 1.0.31, measured 2026-12-04: 92 of 98 modules give a
    # stride-4..32 pyramid (83 before attention-bias tables (CoAtNet,
    # LeViT, EfficientFormer V1/V2), GCViT's windows, Hiera's unroll and
    # SAME padding (Xception, Inception v4, Inception-ResNet-v2); 77 before
    # pyramid='fill' completed models without some of strides 4..32; 67
    # before position state was made per input grid and Twins/MViTv2/
    # TResNet levels mapped; 60 before the probe found divisors, input
    # pads and nested encoders). The other 6 are refused at build with a
    # ValueError (one input size: gMLP, NesT, PiT; maps smaller than
    # their strides: Inception v3; levels timm's metadata names jointly:
    # CoaT, CrossViT). None has other strides or is refused at forward.
    assert counts['pyramid 4..32'] >= 92
    assert counts['pyramid 4..32'] + counts['refused at build'] == len(
        results)
