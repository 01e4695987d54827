"""The backbone contract, run on every registered VB backbone.

Every family registered in mmengine's MODELS gets this whole suite through
``backbone_cases.BACKBONE_CASES``.
"""
import copy
import inspect
import math
import re

import numpy as np
import pytest
import torch
from backbone_cases import BACKBONE_CASES, build, case_id, iter_cases
from conftest import max_abs_diff, randomize_bn
from mmengine.registry import MODELS
from torch import nn

from vb_plugin.layers import (FrozenBatchNorm2d, is_batch_norm,
                              registered_norm_types)
from vb_plugin.models import VBBackbone

CASES = [
    pytest.param(name, case, id=f'{name}[{case_id(case)}]')
    for name, case in iter_cases()
]
FIRST_CASES = [
    pytest.param(name, cases[0], id=name)
    for name, cases in BACKBONE_CASES.items()
]


def registered_vb_backbones():
    return sorted(
        name for name, cls in MODELS.module_dict.items()
        if isinstance(cls, type) and issubclass(cls, VBBackbone))


def test_every_registered_backbone_has_cases():
    registered = registered_vb_backbones()
    assert registered, 'no VB backbone is registered in MODELS'
    assert set(registered) == set(BACKBONE_CASES), (
        'every registered VB backbone needs small cases in backbone_cases.py')


def param_names(module: nn.Module, names) -> set:
    out = set()
    for name in names:
        out |= {f'{name}.{p}' for p, _ in module.get_submodule(name)
                .named_parameters()}
    return out


@pytest.mark.parametrize('name,case', CASES)
def test_outputs_match_metadata(name, case):
    model = build(name, case).eval()
    n = model.num_stages
    assert model.out_indices == tuple(range(n))
    h, w = 64, 96
    outs = model(torch.rand(2, 3, h, w))
    assert isinstance(outs, tuple) and len(outs) == n
    assert len(model.out_channels) == len(model.out_strides) == n
    for out, c, s in zip(outs, model.out_channels, model.out_strides):
        assert out.shape == (2, c, h // s, w // s)
    assert list(model.out_strides) == sorted(model.out_strides)
    assert model.out_strides[0] == 4


@pytest.mark.parametrize('name,case', CASES)
@pytest.mark.parametrize('size', [(32, 32), (33, 47), (65, 97)])
def test_any_input_size(name, case, size):
    model = build(name, case).eval()
    h, w = size
    outs = model(torch.rand(1, 3, h, w))
    for out, c, s in zip(outs, model.out_channels, model.out_strides):
        assert out.shape[1] == c
        assert out.shape[2] in (h // s, math.ceil(h / s))
        assert out.shape[3] in (w // s, math.ceil(w / s))


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_out_indices_select_and_order(name, case):
    full = build(name, case).eval()
    x = torch.rand(1, 3, 64, 64)
    ref = full(x)
    n = full.num_stages
    for indices, expect in [((n - 1, 0), (0, n - 1)), ((-1, ), (n - 1, )),
                            ((1, -2), (1, n - 2)), ((0, ), (0, ))]:
        model = build(name, case, out_indices=indices).eval()
        model.load_state_dict(full.state_dict(), strict=False)
        assert model.out_indices == expect
        outs = model(x)
        assert len(outs) == len(expect)
        for out, i in zip(outs, expect):
            assert torch.equal(out, ref[i])
        assert model.out_channels == tuple(full.stage_channels[i]
                                           for i in expect)


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_out_indices_errors(name, case):
    n = build(name, case).num_stages
    rng = re.escape(f'[{-n}, {n - 1}]')
    bad_values = [
        ((0, n), ValueError, rf'out_indices=\(0, {n}\) has \[{n}\] out of '
         rf'range; valid values are ints in {rng}'),
        ((-n - 1, ), ValueError, rf'out_indices=\({-n - 1},\) has '
         rf'\[{-n - 1}\] out of range'),
        ((1, 1), ValueError, r'out_indices=\(1, 1\) names the same stage '
         r'twice'),
        ((n - 1, -1), ValueError, rf'out_indices=\({n - 1}, -1\) names the '
         rf'same stage twice \(as non-negative indices: \[{n - 1}, {n - 1}\]'),
        ((), ValueError, rf'out_indices must not be empty; valid values are '
         rf'ints in {rng}'),
        ((0, 1.0), TypeError, rf'out_indices must contain only ints in {rng}, '
         r'got 1.0 \(float\)'),
        ((True, ), TypeError, r'got True \(bool\)'),
        ('0123', TypeError, r"out_indices must be a tuple or list of ints in "
         rf"{rng}, got '0123' \(str\)"),
        (3, TypeError, r'got 3 \(int\)'),
    ]
    for value, error, message in bad_values:
        with pytest.raises(error, match=message):
            build(name, case, out_indices=value)


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_unused_stages_not_built(name, case):
    model = build(name, case, out_indices=(1, ))
    assert model.num_built_stages == 2
    names = dict(model.named_modules())
    for stage_name in model.unbuilt_module_names():
        assert stage_name not in names
    full = build(name, case)
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in full.parameters())
    # Every trainable parameter takes part in the loss (what DDP checks).
    model.train()
    sum(o.mean() for o in model(torch.rand(2, 3, 64, 64))).backward()
    unused = [n for n, p in model.named_parameters()
              if p.requires_grad and p.grad is None]
    assert unused == []


def modes(module):
    return {n: m.training for n, m in module.named_modules()}


@pytest.mark.parametrize('name,case', CASES)
@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(name, case, frozen_stages):
    model = build(name, case, frozen_stages=frozen_stages)
    n = model.num_stages
    frozen_stages = min(frozen_stages, n)
    frozen = []
    if frozen_stages >= 0:
        frozen = list(model.stem_module_names())
        for i in range(frozen_stages):
            frozen += model.stage_module_names(i)
    frozen_params = param_names(model, frozen)
    if frozen_stages >= 0:
        frozen_params |= set(model.stem_parameter_names())
    for pname, param in model.named_parameters():
        assert param.requires_grad == (pname not in frozen_params), pname
    if frozen_stages >= 0:
        assert frozen_params  # the stem has parameters in every family

    def check_modes(training):
        for mname, module in model.named_modules():
            in_frozen = any(mname == f or mname.startswith(f + '.')
                            for f in frozen)
            expect = training and not in_frozen
            assert module.training == expect, (mname, training)

    check_modes(model.training)
    for mode in (True, False, True):
        model.train(mode)
        check_modes(mode)
    model.eval()
    check_modes(False)
    model.train()
    check_modes(True)
    # Frozen parameters get no gradient; the others do.
    loss = sum(o.mean() for o in model(torch.rand(2, 3, 64, 64)))
    if frozen_stages == n and not (set(dict(model.named_parameters()))
                                   - frozen_params):
        assert not loss.requires_grad  # everything is frozen
        return
    # NOTE: layers that are no stage (a ViT's pyramid) stay trainable.
    loss.backward()
    for pname, param in model.named_parameters():
        assert (param.grad is None) == (pname in frozen_params), pname


@pytest.mark.parametrize('name,case', FIRST_CASES)
@pytest.mark.parametrize('value,error,message', [
    (-2, ValueError, r'frozen_stages=-2 is out of range; valid values are -1 '
     r'\(freeze nothing\), 0 \(the stem\) up to {n}'),
    ('{n+1}', ValueError, r'frozen_stages={n+1} is out of range'),
    (1.5, TypeError, r'frozen_stages must be an int in \[-1, {n}\], got 1.5 '
     r'\(float\)'),
])
def test_frozen_stages_errors(name, case, value, error, message):
    n = build(name, case).num_stages
    if value == '{n+1}':
        value = n + 1
    message = message.replace('{n+1}', str(n + 1)).replace('{n}', str(n))
    with pytest.raises(error, match=message):
        build(name, case, frozen_stages=value)


@pytest.mark.parametrize('name,case', CASES)
def test_norm_eval(name, case):
    model = build(name, case, norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if is_batch_norm(m)]
    for n, m in model.named_modules():
        assert m.training == (not is_batch_norm(m)), n
    if not bns:
        return  # e.g. GN: nothing to keep in eval mode
    before = copy.deepcopy(model.state_dict())
    model(torch.rand(2, 3, 64, 64))
    after = model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # Without norm_eval, training updates the running statistics.
    plain = build(name, case).train()
    plain(torch.rand(2, 3, 64, 64))
    assert any(m.num_batches_tracked.item() > 0 for m in plain.modules()
               if is_batch_norm(m))


@pytest.mark.parametrize('name,case', CASES)
@pytest.mark.parametrize('frozen_stages', [0, 2])
def test_frozen_bn(name, case, frozen_stages):
    ref = randomize_bn(build(name, case, frozen_stages=frozen_stages))
    model = build(name, case, frozen_stages=frozen_stages, frozen_bn=True)
    assert list(model.state_dict()) == list(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    frozen = set(model.frozen_module_names())
    frozen_bns_expected = sum(
        is_batch_norm(m) for f in frozen
        for m in ref.get_submodule(f).modules())
    for mname, m in model.named_modules():
        top_in_frozen = any(mname == f or mname.startswith(f + '.')
                            for f in frozen)
        if isinstance(m, FrozenBatchNorm2d):
            assert top_in_frozen, mname
        elif is_batch_norm(m):
            assert not top_in_frozen, mname
    # Every BN of the frozen part was converted; without BN (e.g. LN or GN
    # families) the option changes nothing.
    assert sum(isinstance(m, FrozenBatchNorm2d)
               for m in model.modules()) == frozen_bns_expected
    x = torch.rand(2, 3, 64, 64)
    assert max_abs_diff(model.eval()(x), ref.eval()(x)) == 0
    # Training: frozen stages behave as eval-mode BN, and have no params.
    model.train()
    ref.train()
    assert max_abs_diff(model(x), ref(x)) <= 1e-5
    frozen_params = param_names(model, frozen)
    assert all(not model.get_parameter(p).requires_grad
               for p in frozen_params)


@pytest.mark.parametrize('name,case', FIRST_CASES)
@pytest.mark.parametrize('norm_cfg', [
    dict(type='LN2d', eps=1e-6),
    dict(type='BN'),
    dict(type='GN', num_groups=2),
])
def test_out_norms(name, case, norm_cfg):
    model = build(name, case, out_norm_cfg=norm_cfg, out_indices=(0, 2)).eval()
    plain = build(name, case, out_indices=(0, 2)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for norm in model.out_norms.values():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    assert sorted(model.out_norms) == ['0', '2']
    x = torch.rand(2, 3, 64, 64)
    outs, raw = model(x), plain(x)
    for i, out, r in zip((0, 2), outs, raw):
        norm = model.out_norms[str(i)]
        assert norm.weight.shape == (model.stage_channels[i], )
        assert max_abs_diff(out, norm(r)) <= 1e-6
        assert not torch.allclose(out, r)


def norm_options(name):
    """The norm-config options of family ``name``: out_norm_cfg for every
    family, plus its own norm_cfg when it has one."""
    params = inspect.signature(MODELS.get(name).__init__).parameters
    return [o for o in ('out_norm_cfg', 'norm_cfg') if o in params]


def test_registered_norm_types_are_norms_only():
    types = registered_norm_types()
    assert {'BN', 'SyncBN', 'MMSyncBN', 'GN', 'IN', 'LN', 'LN2d'} <= set(types)
    # MODELS holds every model and layer; mmcv's own abbreviation rules
    # would take ConvModule or mmdet's ResLayer for norms.
    assert not {'ConvModule', 'ResLayer', 'Conv2d', 'ReLU'} & set(types)
    assert types == sorted(types)


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_norm_cfg_errors(name, case):
    """'LN' (nn.LayerNorm normalises the last dim: the width of an NCHW map)
    and unknown types fail at construction, naming the option and value."""
    options = norm_options(name)
    assert 'out_norm_cfg' in options
    for option in options:
        with pytest.raises(ValueError, match=(
                rf"^{option}=\{{'type': 'LN'\}}: norm type 'LN' normalises "
                r"the last dim, i\.e\. the width of NCHW maps; use 'LN2d' "
                r"\(channel LayerNorm\)$")):
            build(name, case, **{option: dict(type='LN')})
        with pytest.raises(ValueError, match=(
                rf"^{option}=\{{'type': 'LN', 'eps': 1e-06\}}: norm type "
                r"'LN' normalises the last dim")):
            build(name, case, **{option: dict(type='LN', eps=1e-6)})
        with pytest.raises(ValueError, match='^' + re.escape(
                f"{option}={{'type': 'XX'}}: 'XX' is not a registered norm "
                f'type; registered norm types: {registered_norm_types()} '
                "(for a LayerNorm on NCHW maps use 'LN2d', not 'LN')") + '$'):
            build(name, case, **{option: dict(type='XX')})
        with pytest.raises(ValueError, match='^' + re.escape(
                f"{option}={{'type': 'GN'}}: norm type 'GN' needs "
                "num_groups, e.g. dict(type='GN', num_groups=32)") + '$'):
            build(name, case, **{option: dict(type='GN')})
        with pytest.raises(TypeError, match='^' + re.escape(
                f"{option} must be a dict with a 'type' (a registered norm "
                "type, e.g. 'BN', 'GN', 'LN2d'), got 'LN2d' (str)") + '$'):
            build(name, case, **{option: 'LN2d'})


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_out_norm_cfg_layer_norm_class_is_refused(name, case):
    with pytest.raises(ValueError, match=re.escape(
            'norm type LayerNorm normalises the last dim')):
        build(name, case, out_norm_cfg=dict(type=nn.LayerNorm))


@pytest.mark.parametrize('name,case', CASES)
def test_with_cp_same_outputs_and_grads(name, case):
    ref = build(name, case, frozen_stages=1).train()
    model = build(name, case, frozen_stages=1, with_cp=True).train()
    model.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 64, 64)
    outs_ref, outs = ref(x), model(x)
    assert max_abs_diff(outs, outs_ref) <= 1e-5
    sum((o**2).mean() for o in outs_ref).backward()
    sum((o**2).mean() for o in outs).backward()
    grads = dict(model.named_parameters())
    for pname, param in ref.named_parameters():
        if param.grad is None:
            assert grads[pname].grad is None, pname
        else:
            assert max_abs_diff(grads[pname].grad, param.grad) <= 1e-5, pname


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_pretrained_init_cfg_round_trip(name, case, save_state):
    src = build(name, case)
    src.init_weights()
    path = save_state(src.state_dict())
    model = build(name, case, init_cfg=dict(type='Pretrained', checkpoint=str(path)),
                  )
    model.init_weights()
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_pretrained_in_an_init_cfg_list_loads_strictly(name, case, save_state):
    """A 'Pretrained' entry of an init_cfg list goes through the strict
    loader too (mmengine's would skip a missing key without a word); the
    other entries are applied by mmengine first, as mmengine orders them."""
    from vb_plugin import CheckpointError
    src = build(name, case)
    src.init_weights()
    state = src.state_dict()
    good = save_state(state)
    init = [dict(type='Constant', layer=['Conv2d', 'Linear'], val=0.25),
            dict(type='Pretrained', checkpoint=str(good))]
    model = build(name, case, init_cfg=init)
    model.init_weights()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.init_cfg == init

    first = next(k for k in state if k.endswith('weight'))
    bad = save_state({k: v for k, v in state.items() if k != first})
    model = build(name, case, init_cfg=[
        dict(type='Constant', layer='Conv2d', val=0.25),
        dict(type='Pretrained', checkpoint=str(bad))])
    with pytest.raises(CheckpointError, match=re.escape(first)):
        model.init_weights()

    two = [dict(type='Pretrained', checkpoint='a.pth'),
           dict(type='Pretrained', checkpoint='b.pth')]
    with pytest.raises(ValueError, match='^' + re.escape(
            "init_cfg has 2 entries of type='Pretrained'; give one "
            "checkpoint (got ['a.pth', 'b.pth'])") + '$'):
        build(name, case, init_cfg=two).init_weights()


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_pretrained_into_pruned_model_reports_unbuilt(name, case, save_state):
    from vb_plugin import load_pretrained
    src = build(name, case)
    path = save_state({'state_dict': src.state_dict()})
    model = build(name, case, out_indices=(0, ))
    report = load_pretrained(model, path, verbose=False)
    dropped = report.dropped['stage not built (past the last out_indices)']
    unbuilt = tuple(n + '.' for n in model.unbuilt_module_names())
    assert dropped and all(k.startswith(unbuilt) for k in dropped)
    assert len(report.loaded) + len(dropped) == len(src.state_dict())


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_pretrained_with_output_norms_of_other_outputs(name, case, save_state):
    """A detector trained with out norms on every output loads into one that
    uses fewer outputs: the norms of the others are dropped, and said so."""
    from vb_plugin import load_pretrained
    norm = dict(type='GN', num_groups=2)
    src = build(name, case, out_norm_cfg=norm)
    path = save_state({f'backbone.{k}': v
                       for k, v in src.state_dict().items()})
    model = build(name, case, out_norm_cfg=norm, out_indices=(1, ))
    report = load_pretrained(model, path, verbose=False)
    assert report.dropped['output norm of a stage not in out_indices'] == [
        'out_norms.0.weight', 'out_norms.0.bias'
    ]
    unbuilt = report.dropped['stage not built (past the last out_indices)']
    for i in (2, 3):
        assert f'out_norms.{i}.weight' in unbuilt
    assert torch.equal(model.out_norms['1'].weight,
                       src.out_norms['1'].weight)


@pytest.mark.parametrize('name,case', FIRST_CASES)
@pytest.mark.parametrize('value,error,message', [
    (0, ValueError, 'in_channels=0 is not valid; it must be a positive int'),
    (-3, ValueError,
     'in_channels=-3 is not valid; it must be a positive int'),
    (3.0, TypeError, 'in_channels must be a positive int, got 3.0 (float)'),
    (True, TypeError, 'in_channels must be a positive int, got True (bool)'),
])
def test_in_channels_is_checked_at_build(name, case, value, error, message):
    with pytest.raises(error, match='^' + re.escape(message) + '$'):
        build(name, case, in_channels=value)


@pytest.mark.parametrize('name,case', FIRST_CASES)
def test_input_shape_is_checked_at_forward(name, case):
    """A wrong channel count or rank is a ValueError that names the expected
    shape, not a conv error from deep inside torch."""
    model = build(name, case, in_channels=4).eval()
    assert model(torch.rand(1, 4, 64, 64))[0].shape[0] == 1
    for shape in ((1, 3, 64, 64), (4, 64, 64), (1, 1, 4, 64, 64)):
        with pytest.raises(ValueError, match='^' + re.escape(
                f'{name} takes a batch of images of shape (N, 4, H, W) '
                f'(in_channels=4), got a tensor of shape {shape}') + '$'):
            model(torch.rand(*shape))


@pytest.mark.parametrize('name,case', FIRST_CASES)
@pytest.mark.parametrize('value,hint', [
    ([torch.rand(3, 64, 64)], ' (stack a list of images with torch.stack)'),
    ((torch.rand(1, 3, 64, 64), ), ' (stack a list of images with '
     'torch.stack)'),
    (np.zeros((1, 3, 64, 64), np.float32), ''),
])
def test_input_that_is_not_a_tensor_is_a_type_error(name, case, value, hint):
    """A list of images (or an array) is a TypeError naming what the
    backbone takes, not an AttributeError from deep inside it."""
    model = build(name, case).eval()
    message = (f'{name} takes a batch of images, a torch.Tensor of shape '
               f'(N, {model.in_channels}, H, W), got '
               f'{type(value).__name__}{hint}')
    with pytest.raises(TypeError, match='^' + re.escape(message) + '$'):
        model(value)
