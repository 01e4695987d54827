"""Shared layers: batch-norm detection and freezing."""
import pytest
import torch
import torch.distributed as dist
from mmcv.ops import SyncBatchNorm as MMCVSyncBatchNorm
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm
from conftest import randomize_bn
from torch import nn

from vb_plugin.layers import (FrozenBatchNorm2d, FrozenBatchNormAct2d,
                              freeze_batch_norms, is_batch_norm)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group: mmcv's SyncBN needs one to be built."""
    dist.init_process_group('gloo', rank=0, world_size=1,
                            init_method=f'file://{tmp_path}/pg')
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('make', [
    lambda: nn.BatchNorm2d(4),
    lambda: nn.SyncBatchNorm(4),
    lambda: MMCVSyncBatchNorm(4),
])
def test_batch_norms_freeze_to_same_keys_and_outputs(make, process_group):
    bn = randomize_bn(make()).eval()
    assert is_batch_norm(bn)
    frozen = freeze_batch_norms(bn)
    assert type(frozen) is FrozenBatchNorm2d
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert list(frozen.parameters()) == []
    if not isinstance(bn, MMCVSyncBatchNorm):  # its forward needs a GPU
        x = torch.randn(2, 4, 5, 5)
        assert torch.equal(frozen(x), bn(x))


@pytest.mark.parametrize('sync', [False, True])
def test_norm_act_keeps_its_activation_when_frozen(sync):
    bn = BatchNormAct2d(4, act_layer=nn.ReLU)
    if sync:  # timm's SyncBatchNormAct, as timm's converter makes it
        bn = convert_sync_batchnorm(nn.Sequential(bn))[0]
        assert type(bn).__name__ == 'SyncBatchNormAct'
    bn = randomize_bn(bn).eval()
    frozen = freeze_batch_norms(nn.Sequential(bn))[0]
    assert type(frozen) is FrozenBatchNormAct2d
    assert isinstance(frozen.act, nn.ReLU)
    x = torch.randn(2, 4, 5, 5)
    out = frozen(x)
    assert torch.equal(out, bn(x))
    assert out.min() >= 0


def test_non_batch_norms_are_left_alone():
    for m in (nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.InstanceNorm2d(4)):
        assert not is_batch_norm(m)
        assert freeze_batch_norms(m) is m


def test_freeze_refuses_bn_without_statistics():
    with pytest.raises(ValueError, match=r'frozen_bn: cannot freeze '
                       r'BatchNorm2d with affine=True, '
                       r'track_running_stats=False'):
        freeze_batch_norms(nn.BatchNorm2d(4, track_running_stats=False))


def test_sync_bn_conversion_keeps_norm_act_activation():
    """mmengine's convert_sync_batchnorm (what the Runner applies for
    sync_bn) turns BatchNormAct2d into a SyncBatchNorm that never calls its
    act; vb_plugin's keeps it (timm's SyncBatchNormAct) and converts plain
    BNs as mmengine does."""
    from mmengine.model import convert_sync_batchnorm as mmengine_convert
    from timm.layers.norm_act import SyncBatchNormAct

    from vb_plugin.layers import convert_sync_batchnorm, norm_act_layers

    def make():
        return randomize_bn(nn.Sequential(
            nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act_layer=nn.ReLU),
            nn.BatchNorm2d(4))).eval()

    model = make()
    assert norm_act_layers(model) == ['1']
    x = torch.randn(2, 3, 5, 5)
    ref = model(x)
    synced = convert_sync_batchnorm(model).eval()
    assert [type(m) for m in synced] == [nn.Conv2d, SyncBatchNormAct,
                                         nn.SyncBatchNorm]
    assert norm_act_layers(synced) == []
    assert (synced(x) - ref).abs().max() <= 1e-5
    assert convert_sync_batchnorm(synced) is synced      # idempotent
    assert type(synced[1]) is SyncBatchNormAct
    mangled = mmengine_convert(make()).eval()
    assert type(mangled[1]) is nn.SyncBatchNorm
    assert (mangled(x) - ref).abs().max() > 0.1


def test_sync_bn_conversion_errors():
    from vb_plugin.layers import convert_sync_batchnorm
    with pytest.raises(ValueError, match=r"^sync_bn='nccl' is not valid; "
                       r"use one of \('torch', 'mmcv'\)$"):
        convert_sync_batchnorm(nn.BatchNorm2d(4), 'nccl')
    with pytest.raises(ValueError, match=(
            r"^sync_bn='mmcv' cannot keep the activation of timm's "
            r"BatchNormAct2d \(mmcv's SyncBatchNorm has no form with one, "
            r"and would drop it\); use sync_bn='torch', which converts it "
            r"to timm's SyncBatchNormAct$")):
        convert_sync_batchnorm(nn.Sequential(BatchNormAct2d(4)), 'mmcv')
