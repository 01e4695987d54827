"""tools/inspect_config.py and vb_plugin.inspection: every figure against the real
built model and optimizer."""
import subprocess
import sys
from pathlib import Path

import torch
from mmengine.optim import build_optim_wrapper

from vb_plugin import VBResNet
from vb_plugin.apis import build_detector, load_config
from vb_plugin.inspection import format_summary, inspect_config
from vb_plugin.layers import is_batch_norm

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / 'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')
CONVNEXT = str(ROOT / 'configs/mask_rcnn/mask-rcnn_vb-convnext-t_fpn_1x_coco.py')


def test_stages_frozen_and_bn_modes_match_the_model():
    options = {'model.backbone.frozen_stages': 1,
               'model.backbone.norm_eval': True}
    summary = inspect_config(load_config(TOY, options))
    model = build_detector(load_config(TOY, options), pretrained=False)
    model.train()
    backbone = model.backbone
    assert summary.out_channels == backbone.out_channels
    assert summary.out_strides == backbone.out_strides
    assert [s.index for s in summary.stages] == [-1, 0, 1, 2, 3]
    for st in summary.stages:
        names = (backbone.stem_module_names() if st.index < 0 else
                 backbone.stage_module_names(st.index))
        modules = [backbone.get_submodule(n) for n in names]
        params = [p for m in modules for p in m.parameters()]
        assert st.num_params == sum(p.numel() for p in params)
        assert st.frozen == (not any(p.requires_grad for p in params))
        bns = [m for mod in modules for m in mod.modules()
               if is_batch_norm(m)]
        assert st.batch_norms == len(bns)
        assert st.batch_norms_in_eval == sum(not m.training for m in bns)
        if st.index >= 0:
            assert st.channels == backbone.stage_channels[st.index]
            assert st.stride == backbone.stage_strides[st.index]
    assert [s.frozen for s in summary.stages] == [True, True, False, False,
                                                  False]
    assert summary.neck_in_channels == list(backbone.out_channels)
    text = format_summary(summary)
    assert 'frozen (not updated)' in text
    assert text.splitlines()[-1] == (
        'neck FPN: in_channels [32, 64, 128, 256] <- backbone out_channels '
        '[32, 64, 128, 256] (match)')


def test_learning_rates_are_the_optimizers_own():
    """ConvNeXt-T with layer-wise decay: each parameter's lr and weight decay
    are those of mmengine's optimizer built from the config, and decay makes
    the stem's lr the smallest of the backbone."""
    summary = inspect_config(load_config(CONVNEXT))
    cfg = load_config(CONVNEXT)
    model = build_detector(cfg, pretrained=False)
    # The config's AmpOptimWrapper needs a GPU; the groups come from its
    # constructor either way.
    cfg.optim_wrapper.type = 'OptimWrapper'
    cfg.optim_wrapper.pop('loss_scale', None)
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    by_param = {id(p): (g['lr'], g['weight_decay'])
                for g in optim.param_groups for p in g['params']}
    expected = {n: by_param[id(p)] for n, p in model.named_parameters()}
    seen = [p for st in summary.stages for p in st.params] + [
        p for ps in summary.other_params.values() for p in ps]
    assert sorted(p.name for p in seen) == sorted(expected)
    for p in seen:
        assert (p.lr, p.weight_decay) == expected[p.name], p.name
    stem_lr = {p.lr for p in summary.stages[0].params}
    last_lr = {p.lr for p in summary.stages[-1].params}
    assert max(stem_lr) < min(last_lr) < cfg.optim_wrapper.optimizer.lr


def test_checkpoint_report_and_refusal(tmp_path):
    src = VBResNet(depth=18, base_channels=32)
    good = tmp_path / 'good.pth'
    torch.save(src.state_dict(), good)
    summary = inspect_config(load_config(TOY), str(good))
    assert summary.load_error is None
    assert summary.load_report.startswith(
        f'Loaded {len(src.state_dict())} tensors from {good} (layout: mmdet)')
    bad = tmp_path / 'bad.pth'
    torch.save(VBResNet(depth=18).state_dict(), bad)
    summary = inspect_config(load_config(TOY), str(bad))
    assert summary.load_report is None
    assert 'nothing was loaded into VBResNet' in summary.load_error
    assert 'checkpoint REFUSED: ' in format_summary(summary)


def test_tool_prints_the_summary():
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'inspect_config.py'), TOY,
         '--cfg-options', 'model.backbone.frozen_stages=0'],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == ('backbone VBResNet: out_indices (0, 1, 2, 3), '
                        'out_channels (32, 64, 128, 256), out_strides '
                        '(4, 8, 16, 32)')
    stem = lines[2].split()
    assert stem[:3] == ['stem', '-', '-'] and stem[4:6] == ['yes', '1/1']
