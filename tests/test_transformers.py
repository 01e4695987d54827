"""Transformer backbones from timm (ViT, DINOv2, EVA-02, Swin) at detection
sizes: any input size, the raw levels against timm's own
``forward_intermediates``, ViTDet's simple pyramid and the multi-level one,
frozen stages, loading 224-pixel weights, and Mask R-CNN on top."""
import math
import re

import pytest
import timm
import torch
from conftest import checked_train_step, max_abs_diff

from vb_plugin import VBTimmBackbone

TOL = 1e-5
#: Small widths and depths of the families detection users ask for.
TINY = {
    'vit': ('vit_tiny_patch16_224', dict(depth=4, embed_dim=64,
                                         num_heads=2)),
    'dinov2': ('vit_small_patch14_dinov2', dict(depth=4, embed_dim=64,
                                                num_heads=2)),
    'eva02': ('eva02_tiny_patch14_224', dict(depth=4, embed_dim=64,
                                             num_heads=2)),
    'swin': ('swin_tiny_patch4_window7_224', dict(depths=(1, 1, 1, 1),
                                                  embed_dim=32,
                                                  num_heads=(1, 2, 2, 4))),
}
SINGLE_SCALE = ('vit', 'dinov2', 'eva02')


def reference(key):
    """The timm model itself, with the options VBTimmBackbone gives it."""
    name, kwargs = TINY[key]
    model = VBTimmBackbone(name, model_kwargs=kwargs, pyramid=None)
    return timm.create_model(name, pretrained=False,
                             **model.create_kwargs).eval()


@pytest.mark.parametrize('key', list(TINY))
@pytest.mark.parametrize('size', [(224, 224), (320, 480), (333, 517)])
def test_raw_levels_match_timms_forward_intermediates(key, size):
    """pyramid=None: the outputs are timm's own intermediates (Swin: the
    input padded to its patch size, the outputs cropped), on the same
    weights, at the pretraining size and at detection sizes."""
    name, kwargs = TINY[key]
    ref = reference(key)
    model = VBTimmBackbone(name, model_kwargs=kwargs, pyramid=None).eval()
    missing = model.load_state_dict(
        {f'body.model.{k}' if key != 'swin' else k: v
         for k, v in ref.state_dict().items()}, strict=False)
    if key == 'swin':   # a FeatureListNet: keys are timm's, remapped
        full = {k: ref.state_dict()[v]
                for k, v in model.body_key_map().items()}
        model.load_state_dict(full, strict=True)
    else:
        assert not missing.missing_keys
    x = torch.rand(1, 3, *size)
    h, w = size
    with torch.no_grad():
        outs = model(x)
        if key == 'swin':
            ph, pw = -h % 4, -w % 4
            xp = torch.nn.functional.pad(x, (0, pw, 0, ph))
            feats = ref.forward_intermediates(xp, intermediates_only=True,
                                              output_fmt='NCHW')
            feats = [f[..., :math.ceil(h / s), :math.ceil(w / s)]
                     for f, s in zip(feats, (4, 8, 16, 32))]
        else:
            feats = ref.forward_intermediates(
                x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert len(outs) == len(feats) == 4
    diff = max_abs_diff(outs, tuple(feats))
    print(f'{key} {size}: max abs diff {diff:.3g}')
    assert diff <= TOL


@pytest.mark.parametrize('key', SINGLE_SCALE)
@pytest.mark.parametrize('kind', ['simple', 'multilevel'])
@pytest.mark.parametrize('size', [(320, 480), (333, 517)])
def test_pyramid_shapes_and_strides(key, kind, size):
    name, kwargs = TINY[key]
    model = VBTimmBackbone(name, model_kwargs=kwargs, pyramid=kind).eval()
    width = kwargs['embed_dim']
    assert model.out_strides == (4, 8, 16, 32)
    expected = ((width // 4, width // 2, width, width) if kind == 'simple'
                else (width, ) * 4)
    assert model.out_channels == expected
    h, w = size
    with torch.no_grad():
        outs = model(torch.rand(1, 3, h, w))
    for out, c, s in zip(outs, model.out_channels, model.out_strides):
        grid = (math.ceil(h / 16), math.ceil(w / 16))
        want = {4: (4 * grid[0], 4 * grid[1]), 8: (2 * grid[0], 2 * grid[1]),
                16: grid, 32: (grid[0] // 2, grid[1] // 2)}[s]
        want = (min(want[0], math.ceil(h / s)), min(want[1], math.ceil(w / s)))
        assert tuple(out.shape) == (1, c, *want), (s, out.shape)


@pytest.mark.parametrize('key', ['vit', 'dinov2'])
def test_simple_pyramid_is_vitdets_on_the_last_map(key):
    """Output k is pyramid level k applied to the last block's map (resized
    to the stride-16 grid for patch 14), nothing else."""
    import torch.nn.functional as F
    name, kwargs = TINY[key]
    model = VBTimmBackbone(name, model_kwargs=kwargs).eval()
    ref = reference(key)
    ref.load_state_dict({k[len('body.model.'):]: v for k, v in
                         model.state_dict().items()
                         if k.startswith('body.model.')}, strict=False)
    x = torch.rand(1, 3, 320, 480)
    with torch.no_grad():
        last = ref.forward_intermediates(x, indices=[3],
                                         intermediates_only=True)[0]
        if key == 'dinov2':
            last = F.interpolate(last, size=(20, 30), mode='bilinear',
                                 align_corners=False)
        expect = [model.pyramid[str(i)](last) for i in range(4)]
        outs = model(x)
    assert max_abs_diff(outs, tuple(expect)) <= TOL
    assert [type(m).__name__ for m in model.pyramid['0']] == [
        'ConvTranspose2d', 'LayerNorm2d', 'GELU', 'ConvTranspose2d']
    assert type(model.pyramid['3']).__name__ == 'MaxPool2d'


def test_pyramid_options_errors():
    name, kwargs = TINY['vit']
    with pytest.raises(ValueError, match='^' + re.escape(
            "pyramid='fpn' is not valid; use one of ('auto', 'simple', "
            "'multilevel', None)") + '$'):
        VBTimmBackbone(name, model_kwargs=kwargs, pyramid='fpn')
    with pytest.raises(TypeError, match='^' + re.escape(
            "pyramid must be one of ('auto', 'simple', 'multilevel', None), "
            'got True (bool)') + '$'):
        VBTimmBackbone(name, model_kwargs=kwargs, pyramid=True)
    for pyramid, applies in (
            ('simple', 'models without a pyramid of their own (ViT-style: '
             'no level finer than stride 7 or coarser than 16)'),
            ('multilevel', 'single-scale models (ViT-style, every level at '
             'one stride)')):
        with pytest.raises(ValueError, match='^' + re.escape(
                f"pyramid='{pyramid}' is for {applies}; 'resnet10t' is "
                'already multi-scale (timm strides [2, 4, 8, 16, 32]): use '
                "pyramid=None or 'auto'") + '$'):
            VBTimmBackbone('resnet10t', pyramid=pyramid)
    with pytest.raises(ValueError, match='^' + re.escape(
            "pyramid='simple' needs levels='vb' (its outputs are strides "
            "4..32), got levels='timm'") + '$'):
        VBTimmBackbone(name, model_kwargs=kwargs, levels='timm',
                       pyramid='simple')
    with pytest.raises(ValueError, match='^' + re.escape(
            "pyramid='simple' needs at least 4 blocks (four stages, one per "
            "pyramid level); 'vit_tiny_patch16_224' has 2 feature levels: "
            'use pyramid=None') + '$'):
        VBTimmBackbone(name, model_kwargs=dict(kwargs, depth=2))
    # 'auto' is no pyramid for a multi-scale model.
    assert VBTimmBackbone('resnet10t').pyramid_kind is None


def test_frozen_stages_freeze_embeddings_and_blocks():
    name, kwargs = TINY['vit']
    model = VBTimmBackbone(name, model_kwargs=kwargs, frozen_stages=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in dict(model.named_parameters())
                      if n.startswith(('body.model.patch_embed.',
                                       'body.model.cls_token',
                                       'body.model.pos_embed'))}
    model = VBTimmBackbone(name, model_kwargs=kwargs, frozen_stages=2).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith('body.model.blocks.1.') for n in frozen)
    assert not any(n.startswith('body.model.blocks.2.') for n in frozen)
    assert not any(n.startswith('pyramid.') for n in frozen)
    assert not model.body.model.blocks[1].training
    assert model.body.model.blocks[2].training
    # The pyramid is not a stage: like the output norms, frozen_stages
    # leaves it trainable, even with every block frozen.
    model = VBTimmBackbone(name, model_kwargs=kwargs, frozen_stages=4).train()
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if n.startswith('body.'))
    assert all(p.requires_grad for p in model.pyramid.parameters())
    assert model.pyramid.training


def test_weights_from_224_run_at_detection_sizes(tmp_path):
    """A timm checkpoint saved at 224 loads strictly through init_cfg; the
    pyramid's layers are reported as new; the model runs at 800x1333 and
    at an odd size, and its raw features equal timm's at that size."""
    name, kwargs = TINY['dinov2']
    src = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / 'dinov2_224.pth'
    torch.save(src.state_dict(), path)
    model = VBTimmBackbone(name, model_kwargs=kwargs, init_cfg=dict(
        type='Pretrained', checkpoint=str(path)))
    from vb_plugin.weights.timm import load_timm_pretrained
    report = load_timm_pretrained(model, path, verbose=False)
    assert report.kept_initial and all(k.startswith('pyramid.')
                                       for k in report.kept_initial)
    model.init_weights()
    model.eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 800, 1333))
    assert [tuple(o.shape[-2:]) for o in outs] == [(200, 334), (100, 167),
                                                   (50, 84), (25, 42)]
    raw = VBTimmBackbone(name, model_kwargs=kwargs, pyramid=None,
                         init_cfg=dict(type='Pretrained',
                                       checkpoint=str(path)))
    raw.init_weights()
    ref = timm.create_model(name, pretrained=False,
                            **raw.create_kwargs).eval()
    ref.load_state_dict(src.state_dict())
    x = torch.rand(1, 3, 333, 517)
    with torch.no_grad():
        diff = max_abs_diff(raw.eval()(x), tuple(ref.forward_intermediates(
            x, indices=[0, 1, 2, 3], intermediates_only=True)))
    assert diff <= TOL


@pytest.mark.parametrize('key', ['vit', 'swin'])
def test_mask_rcnn_trains_and_predicts_at_a_detection_size(key):
    """A Mask R-CNN with the small ViT (simple pyramid) or Swin: one
    training step and a prediction on 2 non-square, non-224 images."""
    from mmengine.config import Config
    from vb_plugin.apis import build_detector, synthetic_detection_batch
    name, kwargs = TINY[key]
    cfg = Config.fromfile('configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')
    cfg.model.backbone = dict(type='VBTimmBackbone', model_name=name,
                              model_kwargs=kwargs, frozen_stages=0)
    model = build_detector(cfg, pretrained=False)
    assert model.backbone.out_strides == (4, 8, 16, 32)
    batch = synthetic_detection_batch(num_images=2, size=(192, 288),
                                      num_classes=3)
    losses, preds, _ = checked_train_step(model, batch,
                                          frozen_prefixes=('body.',))
    assert len(preds) == 2 and preds[0].pred_instances.bboxes.shape[1] == 4


@pytest.mark.parametrize('name,table', [
    ('cait_xxs24_224', 'body.model.pos_embed'),
    ('beit_base_patch16_224',
     'body.model.blocks.0.attn.relative_position_bias_table'),
])
def test_mask_rcnn_trains_fixed_position_tables_at_a_detection_size(
        name, table):
    """CaiT's position embedding and BEiT's relative position tables are
    fixed to the 14x14 grid in timm; resampled per input, a Mask R-CNN
    trains on non-square 192x288 images and the step updates them (the
    tables are parameters of their pretraining shape)."""
    from mmengine.config import Config
    from vb_plugin.apis import build_detector, synthetic_detection_batch
    cfg = Config.fromfile('configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')
    cfg.model.backbone = dict(
        type='VBTimmBackbone', model_name=name,
        model_kwargs=dict(depth=4, embed_dim=32, num_heads=2))
    model = build_detector(cfg, pretrained=False)
    assert model.backbone.out_strides == (4, 8, 16, 32)
    batch = synthetic_detection_batch(num_images=2, size=(192, 288),
                                      num_classes=3)
    _, preds, before = checked_train_step(model, batch)
    after = dict(model.backbone.named_parameters())[table]
    assert after.shape == before[table].shape
    assert not torch.equal(after, before[table])
    assert len(preds) == 2


def test_layer_decay_by_block_from_the_real_optimizer():
    """ViTDet's layer-wise decay (0.7) through VBLayerDecayOptimizerConstructor:
    embeddings are layer 0, block i is layer i + 1, the pyramid, neck and
    heads layer num_layers + 1 (num_layers = the 4 blocks, read from the
    backbone); each parameter's lr is lr * 0.7 ** (num_layers + 1 - id)."""
    from mmengine.optim import build_optim_wrapper
    from vb_plugin.apis import build_detector, load_config
    cfg = load_config('configs/mask_rcnn/mask-rcnn_vb-vit-tiny_fpn_toy.py')
    model = build_detector(cfg, pretrained=False)
    optim = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    lr = cfg.optim_wrapper.optimizer.lr
    wd = cfg.optim_wrapper.optimizer.weight_decay
    assert model.backbone.lr_decay_num_layers == 4

    def vitdet_layer_id(name):
        if name.startswith('backbone.body.model.blocks.'):
            return int(name.split('.')[4]) + 1
        if name.startswith(('backbone.body.model.patch_embed.',
                            'backbone.body.model.pos_embed',
                            'backbone.body.model.cls_token')):
            return 0
        return 5

    seen = {}
    for group in optim.param_groups:
        for p in group['params']:
            seen[id(p)] = group
    ids = set()
    for name, p in model.named_parameters():
        group = seen[id(p)]
        layer = vitdet_layer_id(name)
        ids.add(layer)
        assert group['lr'] == pytest.approx(lr * 0.7**(5 - layer),
                                            rel=1e-12), name
        no_decay = p.ndim == 1 or name.endswith(('pos_embed', 'cls_token'))
        assert group['weight_decay'] == (0.0 if no_decay else wd), name
    assert ids == {0, 1, 2, 3, 4, 5}
