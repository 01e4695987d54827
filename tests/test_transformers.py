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

from vb_plugin import VBTimmBackbone, load_pretrained

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
            "'multilevel', 'fill', None)") + '$'):
        VBTimmBackbone(name, model_kwargs=kwargs, pyramid='fpn')
    with pytest.raises(TypeError, match='^' + re.escape(
            "pyramid must be one of ('auto', 'simple', 'multilevel', 'fill', "
            "None), got True (bool)") + '$'):
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


#: Multi-scale models without some of strides 4..32: (name, input size,
#: the timm level each output comes from, octaves it is moved finer).
FILLED = [
    # 16, 32, 64: strides 4 and 8 from the stride-16 level, 64 left out.
    ('efficientvit_m0', (225, 301), (0, 0, 0, 1), (2, 1, 0, 0)),
    # 8, 8, 16, 32, 64: stride 4 from the second stride-8 level.
    ('csatv2', (256, 320), (1, 1, 2, 3), (1, 0, 0, 0)),
    # 2, 4, 8, 16, 32, 64: nothing to make; the stride-64 level left out.
    ('selecsls42', (225, 301), (1, 2, 3, 4), (0, 0, 0, 0)),
]


@pytest.mark.parametrize('name,size,sources,steps', FILLED,
                         ids=[c[0] for c in FILLED])
def test_filled_pyramid_keeps_the_models_levels_and_makes_the_missing(
        name, size, sources, steps, tmp_path):
    """'auto' completes a multi-scale model to strides 4..32: a stride it
    has is timm's own map (a timm checkpoint loads strictly; the new layers
    are reported as such); a finer one is its nearest coarser level through
    2x2 transposed convs (each halving the channels); a coarser one than 32
    is not built."""
    src = timm.create_model(name, pretrained=False)
    path = tmp_path / 'w.pth'
    torch.save(src.state_dict(), path)
    model = VBTimmBackbone(name)
    assert model.pyramid_kind == 'fill'
    report = load_pretrained(model, path, verbose=False)
    assert all(k.startswith('pyramid.') for k in report.kept_initial)
    assert len(report.kept_initial) == 2 * sum(
        s for s in steps) + 2 * sum(s > 1 for s in steps)
    model.eval()
    channels = [src.feature_info[j]['num_chs'] for j in sources]
    assert model.out_strides == (4, 8, 16, 32)
    assert model.out_channels == tuple(
        c // 2**s for c, s in zip(channels, steps))
    # NOTE: the levels past stride 32 are not built.
    ref = timm.create_model(name, pretrained=False, features_only=True,
                            out_indices=sorted(set(sources)),
                            **model.create_kwargs).eval()
    ref.load_state_dict({k[len('body.'):]: v for k, v in
                         model.state_dict().items()
                         if k.startswith('body.')})
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        outs = model(x)
        refs = dict(zip(sorted(set(sources)), ref(x)))
    for i, (out, j, s) in enumerate(zip(outs, sources, steps)):
        stride = 4 * 2**i
        assert tuple(out.shape) == (1, model.out_channels[i],
                                    math.ceil(size[0] / stride),
                                    math.ceil(size[1] / stride))
        layer = model.pyramid[str(i)]
        kinds = ([type(m).__name__ for m in layer]
                 if isinstance(layer, torch.nn.Sequential)
                 else [type(layer).__name__])
        assert kinds == {0: ['Identity'], 1: ['ConvTranspose2d'],
                         2: ['ConvTranspose2d', 'LayerNorm2d', 'GELU',
                             'ConvTranspose2d']}[s]
        with torch.no_grad():
            expect = layer(refs[j])[..., :out.shape[2], :out.shape[3]]
        diff = max_abs_diff(out, expect)
        print(f'{name} output {i} (stride {stride}): max abs diff {diff:.3g}')
        assert diff <= TOL


def test_filled_stages_and_frozen_stages():
    """frozen_stages counts strides in every family: EfficientViT-MSRA has
    no level at stride 4 or 8, so stages 0 and 1 hold nothing, and
    freezing them freezes the stem only; the made levels are never frozen;
    out_indices=(0, ) builds up to the stride-16 level it comes from."""
    def frozen(model):
        return {n.split('.')[1] for n, p in model.named_parameters()
                if not p.requires_grad}

    model = VBTimmBackbone('efficientvit_m0', frozen_stages=2)
    assert model.stage_module_names(0) == model.stage_module_names(1) == ()
    assert model.stage_module_names(2) == ('body.stages_0', )
    assert frozen(model) == {'patch_embed_conv1', 'patch_embed_conv2',
                             'patch_embed_conv3', 'patch_embed_conv4'}
    model = VBTimmBackbone('efficientvit_m0', frozen_stages=3)
    assert frozen(model) == {'patch_embed_conv1', 'patch_embed_conv2',
                             'patch_embed_conv3', 'patch_embed_conv4',
                             'stages_0'}
    assert all(p.requires_grad for p in model.pyramid.parameters())
    model = VBTimmBackbone('efficientvit_m0', out_indices=(0, ))
    assert model.num_built_stages == 3 and model.out_channels == (16, )
    assert not hasattr(model.body, 'stages_1')
    assert tuple(model.eval()(torch.rand(1, 3, 64, 96))[0].shape) == (
        1, 16, 16, 24)


def test_filled_pyramid_errors():
    for kwargs, strides in ((dict(output_stride=16),
                             '[2, 4, 8, 16, 16] (output_stride=16)'),
                            (dict(model_name='sequencer2d_s'),
                             '[7, 14, 14, 14]')):
        kwargs.setdefault('model_name', 'resnet10t')
        with pytest.raises(ValueError, match='^' + re.escape(
                "pyramid='fill' completes a model's own levels at strides 4, "
                f"8, 16, 32 to all four; {kwargs['model_name']!r} has timm "
                f"strides {strides}: use pyramid=None or 'auto'") + '$'):
            VBTimmBackbone(pyramid='fill', **kwargs)
    with pytest.raises(ValueError, match='^' + re.escape(
            "pyramid='fill' needs levels='vb' (its outputs are strides "
            "4..32), got levels='timm'") + '$'):
        VBTimmBackbone('efficientvit_m0', levels='timm', pyramid='fill')
    # A dilated model keeps its strides under 'auto'; levels='timm' and
    # pyramid=None keep the raw levels.
    assert VBTimmBackbone('resnet10t', output_stride=16).out_strides == (
        4, 8, 16, 16)
    assert VBTimmBackbone('efficientvit_m0', levels='timm').out_strides == (
        16, 32, 64)
    assert VBTimmBackbone('efficientvit_m0', pyramid=None).out_strides == (
        16, 32, 64)


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
    report = load_pretrained(model, path, verbose=False)
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
