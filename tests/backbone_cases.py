"""Small configurations of every registered VB backbone for the contract
suite. A family registered without an entry here fails
``test_every_registered_backbone_has_cases``."""

BACKBONE_CASES = {
    'VBResNet': [
        dict(depth=18, base_channels=8),
        dict(depth=50, base_channels=8),
        dict(depth=50, base_channels=8, deep_stem=True, avg_down=True,
             style='caffe'),
        dict(depth=18, base_channels=8,
             norm_cfg=dict(type='GN', num_groups=4, requires_grad=True)),
    ],
    'VBRegNet': [
        # Tiny custom archs: stage widths (8, 16, 24, 40).
        dict(arch=dict(w0=8, wa=8.0, wm=1.5, group_w=4, depth=6,
                       bot_mul=0.5, se_ratio=0.25), stem_channels=8),
        dict(arch=dict(w0=8, wa=8.0, wm=1.5, group_w=8, depth=6),
             stem_channels=8,
             norm_cfg=dict(type='GN', num_groups=4, requires_grad=True)),
        dict(arch='regnetx_200mf'),
    ],
    'VBConvNeXt': [
        # Output norms are on by default for ConvNeXt; the contract suite
        # checks raw stage outputs, and adds out norms itself. The BN case
        # gives norm_eval and frozen_bn something to act on.
        dict(arch=dict(depths=[1, 1, 2, 1], channels=[8, 16, 32, 64]),
             out_norm_cfg=None),
        dict(arch=dict(depths=[1, 1, 2, 1], channels=[8, 16, 32, 64]),
             version='v2', out_norm_cfg=None),
        dict(arch=dict(depths=[1, 2, 1, 1], channels=[8, 16, 24, 32]),
             layer_scale_init_value=0.5, norm_cfg=dict(type='BN'),
             out_norm_cfg=None),
    ],
    'VBTimmBackbone': [
        dict(model_name='resnet10t'),
        # BatchNormAct2d (norm + act in one layer) and a stride-2 level.
        dict(model_name='mobilenetv3_small_050'),
        dict(model_name='regnetx_002'),
        # Single-scale transformers: ViTDet's simple pyramid (default) and
        # the multi-level one; Swin pads its input to the patch size.
        dict(model_name='vit_tiny_patch16_224',
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        dict(model_name='vit_small_patch14_dinov2', pyramid='multilevel',
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        # ViTDet's windowed form: window attention (blocks 1 and 3 global),
        # decomposed relative positions, no class token; DINOv2 with
        # registers (removed) and patch 14. (EVA-02's RoPE is tested in
        # test_vitdet.py: timm's EVA does not export to ONNX.)
        dict(model_name='vit_base_patch16_224', window_size=3,
             global_blocks=(1, 3), rel_pos=True,
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        dict(model_name='vit_small_patch14_reg4_dinov2', window_size=3,
             rel_pos=True, model_kwargs=dict(depth=4, embed_dim=32,
                                             num_heads=2, img_size=98)),
        # Its blocks live inside an encoder that timm's feature_info does
        # not name (levels 'encoder.blocks.k' under FeatureGetterNet's
        # 'model.encoder'): stages are read from inside it.
        dict(model_name='qwen3_vit_88m',
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        # No timm option for other sizes: its position embedding is
        # resampled per input from the pretraining grid (position_grids).
        dict(model_name='cait_xxs24_224',
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        # Relative position tables spanning the token grid, resized per
        # input with their index and window.
        dict(model_name='beit_base_patch16_224',
             model_kwargs=dict(depth=4, embed_dim=32, num_heads=2)),
        # Strides 16, 32, 64: strides 4 and 8 made from the stride-16
        # level, 64 left out (pyramid='fill').
        dict(model_name='efficientvit_m0'),
        # Attention biases by token offset (resized per input grid) and
        # strides 16, 32, 64 (filled to 4..32).
        dict(model_name='levit_128s',
             model_kwargs=dict(embed_dim=(32, 48, 64), key_dim=16,
                               depth=(1, 1, 1), num_heads=(2, 3, 4))),
        # Relative position biases over a whole map (CoAtNet).
        dict(model_name='test_coatnet'),
        # Tokens unrolled into mask units by a schedule made per input.
        dict(model_name='hiera_tiny_224',
             model_kwargs=dict(embed_dim=16, num_heads=1,
                               stages=(1, 1, 2, 1))),
        dict(model_name='swin_tiny_patch4_window7_224', drop_path_rate=0.0,
             model_kwargs=dict(depths=(1, 1, 1, 1), embed_dim=16,
                               num_heads=(1, 1, 2, 2))),
    ],
}

def case_id(case):
    return ','.join(f'{k}={v["type"] if k == "norm_cfg" else v}'
                    for k, v in case.items()
                    if k != 'out_norm_cfg') or 'default'


def iter_cases():
    for name, cases in BACKBONE_CASES.items():
        for case in cases:
            yield name, case


def build(name, case=None, **overrides):
    """Build backbone ``name`` from a case, with a test's own options on
    top."""
    from mmengine.registry import MODELS
    return MODELS.build(dict(type=name, **{**(case or {}), **overrides}))
