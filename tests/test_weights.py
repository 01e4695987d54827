"""The shared loader: safe reading, layout detection and strictness."""
import builtins
import re

import numpy as np
import pytest
import torch
import torchvision
from mmengine.logging import HistoryBuffer

from vb_plugin import CheckpointError, VBResNet, load_pretrained
from vb_plugin.weights import read_checkpoint


class RunsCode:
    """A pickle payload that creates a file when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, 'w'))


def small_resnet(**kwargs):
    return VBResNet(depth=18, base_channels=8, **kwargs)


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.zeros(1)}, 'x': RunsCode(marker)},
               path)
    assert not marker.exists()
    with pytest.raises(CheckpointError,
                       match=r'refused to read .*evil\.pth.* with '
                       r'weights_only=True'):
        read_checkpoint(path)
    model = small_resnet()
    before = state_of(model)
    with pytest.raises(CheckpointError, match='weights_only=True'):
        load_pretrained(model, path)
    assert not marker.exists(), 'the payload ran'
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mmengine_style_checkpoint_with_numpy_meta_loads(save_state):
    """What mmengine's Runner writes beside the weights: numpy values in
    meta, HistoryBuffers in message_hub. The allow-list covers them."""
    src = small_resnet()
    buf = HistoryBuffer()
    buf.update(np.float64(0.5))
    ckpt = {
        'meta': {'seed': np.int64(3), 'iter': 1, 'lr': np.float32(0.1),
                 'hist': np.zeros((2, 2))},
        'message_hub': {'log_scalars': {'train/loss': buf}},
        'state_dict': {
            **{f'backbone.{k}': v for k, v in src.state_dict().items()},
            'neck.conv.weight': torch.zeros(2, 2, 1, 1),
            'roi_head.fc.weight': torch.zeros(3, 2),
        },
    }
    model = small_resnet()
    report = load_pretrained(model, save_state(ckpt), verbose=False)
    assert report.prefix == 'backbone.'
    assert (report.source, report.container) == ('mmdet', 'state_dict')
    assert report.dropped == {
        "outside prefix 'backbone.'":
        ['neck.conv.weight', 'roi_head.fc.weight']
    }
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_empty_values_of_a_runner_checkpoint_load(tmp_path):
    """Pickle protocol 2 writes b'' as a call to bytes(): an empty numpy
    array, such as the history of a HistoryBuffer never updated, needs it.
    Only the empty call is allowed, not bytes(n)."""
    path = tmp_path / 'empty.pth'
    torch.save({'message_hub': {'log_scalars': {'val/x': HistoryBuffer()}},
                'meta': {'empty': np.zeros((0, 3))}, 'b': b''}, path)
    out = read_checkpoint(path)
    assert out['message_hub']['log_scalars']['val/x'].data[0].shape == (0, )
    assert out['meta']['empty'].shape == (0, 3) and out['b'] == b''

    class AllocatesBytes:
        def __reduce__(self):
            return bytes, (10**6, )

    torch.save({'x': AllocatesBytes()}, path)
    with pytest.raises(CheckpointError, match=r'refused bytes\(1000000,\)'):
        read_checkpoint(path)


@pytest.mark.parametrize('damage,message', [
    (lambda sd: sd.pop('layer2.0.conv1.weight'),
     r'missing from the checkpoint: 1 \[layer2\.0\.conv1\.weight\]'),
    (lambda sd: sd.__setitem__('layer9.0.conv1.weight', torch.zeros(1)),
     r'unexpected \(not in the model\): 1 \[layer9\.0\.conv1\.weight\]'),
    (lambda sd: sd.__setitem__('layer1.0.conv1.weight',
                               torch.zeros(8, 8, 1, 1)),
     r'wrong shape: 1 \[layer1\.0\.conv1\.weight: checkpoint '
     r'\(8, 8, 1, 1\) vs model \(8, 8, 3, 3\)\]'),
])
def test_strict_failures_load_nothing(damage, message, save_state):
    sd = small_resnet().state_dict()
    damage(sd)
    model = small_resnet()
    before = state_of(model)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(model, save_state(sd), verbose=False)
    assert re.search(message, str(info.value)), str(info.value)
    assert 'nothing was loaded into VBResNet' in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wrong_architecture_is_caught(save_state):
    path = save_state(torchvision.models.resnet18().state_dict())
    with pytest.raises(CheckpointError, match=r'missing from the checkpoint'):
        load_pretrained(VBResNet(depth=34), path, verbose=False)
    with pytest.raises(CheckpointError, match=r'wrong shape'):
        load_pretrained(VBResNet(depth=18, base_channels=32), path,
                        verbose=False)


def test_unknown_layout_and_source(save_state):
    path = save_state({'encoder.weight': torch.zeros(2)})
    with pytest.raises(CheckpointError,
                       match=r"checkpoint layout not recognised \(source="
                       r"'auto'\); known layouts: \['hf: .*First keys: "
                       r"\['encoder\.weight'\]"):
        load_pretrained(small_resnet(), path)
    good = save_state(small_resnet().state_dict())
    with pytest.raises(CheckpointError,
                       match=r"source='keras' is not known for this "
                       r"backbone; valid values are 'auto' or one of \["):
        load_pretrained(small_resnet(), good, source='keras')
    with pytest.raises(CheckpointError,
                       match=r"checkpoint layout not recognised \(source="
                       r"'hf'\)"):
        load_pretrained(small_resnet(), good, source='hf')


def test_prefix_and_containers(save_state):
    src = small_resnet()
    sd = src.state_dict()
    for wrapped, prefix in [
        ({'model': sd}, None),
        ({'model_state': sd, 'epoch': 3}, None),
        ({f'module.{k}': v for k, v in sd.items()}, None),
        ({'state_dict': {f'encoder.body.{k}': v for k, v in sd.items()}},
         'encoder.body.'),
    ]:
        model = small_resnet()
        load_pretrained(model, save_state(wrapped), prefix=prefix,
                        verbose=False)
        for k, v in sd.items():
            assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(CheckpointError,
                       match=r"prefix='student\.': no key starts with it"):
        load_pretrained(small_resnet(), save_state(sd), prefix='student.')


def test_not_a_state_dict(save_state):
    with pytest.raises(CheckpointError,
                       match=r'checkpoint root is not a state dict: 1 '
                       r"entries are not tensors, e.g. \['epoch'\]"):
        load_pretrained(small_resnet(),
                        save_state({'w': torch.zeros(1), 'epoch': 3}))


def test_missing_file_and_uncached_url(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError,
                       match=r"checkpoint file not found: '.*nope\.pth'"):
        load_pretrained(small_resnet(), tmp_path / 'nope.pth')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 'torchvision://resnet18' is not "
                       r'on this machine: vb_plugin reads local files only'):
        load_pretrained(VBResNet(depth=18), 'torchvision://resnet18')


def test_open_mmlab_scheme_reads_hub_cache(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import get_external_models
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    src = VBResNet(depth=50, style='caffe')
    url = get_external_models()['detectron2/resnet50_caffe']
    torch.save(src.state_dict(), cache / url.split('/')[-1])
    for address in ('open-mmlab://detectron2/resnet50_caffe',
                    'openmmlab://detectron2/resnet50_caffe'):
        model = VBResNet(depth=50, style='caffe')
        load_pretrained(model, address, verbose=False)
        assert torch.equal(model.layer3[0].conv2.weight,
                           src.layer3[0].conv2.weight)
    with pytest.raises(CheckpointError,
                       match=r"checkpoint 'open-mmlab://nope': unknown "
                       r"open-mmlab model 'nope'; known names include"):
        load_pretrained(model, 'open-mmlab://nope')


def test_torchvision_scheme_reads_hub_cache(tmp_path, monkeypatch):
    from mmengine.runner.checkpoint import get_torchvision_models
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    ref = torchvision.models.resnet18()
    name = get_torchvision_models()['resnet18'].split('/')[-1]
    torch.save(ref.state_dict(), cache / name)
    model = VBResNet(
        depth=18,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18'))
    model.init_weights()
    assert torch.equal(model.conv1.weight, ref.conv1.weight)


def test_pretrained_init_cfg_options(save_state):
    src = small_resnet()
    path = save_state({f'backbone.{k}': v for k, v in src.state_dict().items()})
    model = small_resnet(init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                       prefix='backbone.', source='mmdet'))
    model.init_weights()
    assert torch.equal(model.layer4[1].conv2.weight,
                       src.layer4[1].conv2.weight)
    bad = small_resnet(init_cfg=dict(type='Pretrained', checkpoint=str(path),
                                     strict=False))
    with pytest.raises(ValueError,
                       match=r"init_cfg: unknown keys \['strict'\] for "
                       r"type='Pretrained'; allowed: checkpoint, prefix, "
                       r'source'):
        bad.init_weights()


def test_report_text(save_state):
    path = save_state(torchvision.models.resnet18().state_dict())
    report = load_pretrained(VBResNet(depth=18, out_indices=(0, 1),
                                      out_norm_cfg=dict(type='LN2d')),
                             path, verbose=False)
    text = str(report)
    assert text.splitlines()[0] == (f'Loaded {len(report.loaded)} tensors '
                                    f'from {path} (layout: mmdet)')
    assert "dropped as expected, classifier head: 2 [fc.weight, fc.bias]" \
        in text
    assert 'dropped as expected, stage not built (past the last ' \
        'out_indices): ' in text
    assert 'kept initial values (not in the checkpoint by design): 4 ' \
        '[out_norms.0.weight, out_norms.0.bias, out_norms.1.weight, ' \
        'out_norms.1.bias]' in text
