"""ViTDet's windowed form of plain timm ViTs (VBTimmBackbone's window_size,
global_blocks, rel_pos): parity with an independent reference written here
from the ViTDet paper and detectron2's documented behaviour, with timm's
SAM-ViT at its pretraining size, with timm's EVA attention per window; the
checkpoint layouts; errors; export.
"""
import math
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import max_abs_diff

from vb_plugin import VBTimmBackbone, export_onnx, load_pretrained
from vb_plugin.models.timm.windows import default_global_blocks

# A tiny ViT-B-like model: 4 blocks, 64 wide, 2 heads (head dim 32).
TINY = dict(embed_dim=64, depth=4, num_heads=2)
DETECTION_SIZES = [(224, 224), (320, 480), (512, 768), (800, 1216)]


def windowed_vit(**kwargs):
    options = dict(model_name='vit_base_patch16_224', model_kwargs=TINY,
                   window_size=14, global_blocks=(1, 3), rel_pos=True,
                   pyramid=None, out_indices=(3, ))
    options.update(kwargs)
    return VBTimmBackbone(**options)


def randomize(model, seed=0, rel_scale=0.5):
    """Random values everywhere, the zero-initialised tables included, so
    every term of the forward matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = rel_scale if 'rel_pos' in name else 0.05
            p.copy_(torch.randn(p.shape, generator=gen) * scale
                    + (1.0 if name.endswith('norm1.weight')
                       or name.endswith('norm2.weight') else 0.0))
    return model


def vit_state(model):
    """The windowed backbone's weights under the ViT's own names (those of
    detectron2's ViT: patch_embed.proj, pos_embed, blocks.i.*)."""
    return {k[len('body.model.'):]: v.detach().clone()
            for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------
# An independent reference of ViTDet's ViT, written from the paper and
# detectron2's documented behaviour (plain torch, loops over windows).
def ref_layer_norm(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f'{name}.weight'],
                        sd[f'{name}.bias'], eps=1e-6)


def ref_rel_rows(table, size):
    """Rows for every (query, key) offset pair of ``size`` positions: the
    table linearly resized to 2 * size - 1 rows first when it differs."""
    length = 2 * size - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode='linear',
                              align_corners=False)[0].t()
    rows = torch.empty(size, size, table.shape[1])
    for i in range(size):
        for j in range(size):
            rows[i, j] = table[i - j + size - 1]
    return rows


def ref_attention(x, sd, name, heads):
    """Global attention over one (H, W, C) grid, with decomposed relative
    positions when the block has tables."""
    h, w, c = x.shape
    qkv = x.reshape(h * w, c) @ sd[f'{name}.qkv.weight'].t() + sd[
        f'{name}.qkv.bias']
    q, k, v = qkv.reshape(h * w, 3, heads, c // heads).permute(1, 2, 0, 3)
    logits = (q * (c // heads)**-0.5) @ k.transpose(-1, -2)
    if f'{name}.rel_pos_h' in sd:
        rh = ref_rel_rows(sd[f'{name}.rel_pos_h'], h)   # (h, h, d)
        rw = ref_rel_rows(sd[f'{name}.rel_pos_w'], w)   # (w, w, d)
        grid_q = q.reshape(heads, h, w, -1)
        rel_h = torch.einsum('nhwd,hkd->nhwk', grid_q, rh)
        rel_w = torch.einsum('nhwd,wkd->nhwk', grid_q, rw)
        logits = (logits.reshape(heads, h, w, h, w)
                  + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
                  ).reshape(heads, h * w, h * w)
    out = (logits.softmax(-1) @ v).permute(1, 0, 2).reshape(h * w, c)
    out = out @ sd[f'{name}.proj.weight'].t() + sd[f'{name}.proj.bias']
    return out.reshape(h, w, c)


def ref_windowed(x, sd, name, heads, window):
    """Zero-pad the grid to multiples of the window, attend inside each
    window, crop back."""
    h, w, c = x.shape
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    padded = torch.zeros(hp, wp, c)
    padded[:h, :w] = x
    out = torch.empty_like(padded)
    for top in range(0, hp, window):
        for left in range(0, wp, window):
            out[top:top + window, left:left + window] = ref_attention(
                padded[top:top + window, left:left + window], sd, name,
                heads)
    return out[:h, :w]


def ref_vitdet(image, sd, heads, window, global_blocks, patch=16):
    """ViTDet's ViT on one image (C, H, W) -> last map (C, H/16, W/16)."""
    x = F.conv2d(image[None], sd['patch_embed.proj.weight'],
                 sd['patch_embed.proj.bias'], stride=patch)[0]
    c, h, w = x.shape
    # The pretrained embedding without its class slot, plain bicubic.
    pos = sd['pos_embed'][0, 1:]
    side = int(round(math.sqrt(pos.shape[0])))
    pos = pos.reshape(side, side, c).permute(2, 0, 1)[None]
    if (side, side) != (h, w):
        pos = F.interpolate(pos, size=(h, w), mode='bicubic',
                            align_corners=False)
    x = (x + pos[0]).permute(1, 2, 0)
    depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
    for i in range(depth):
        name = f'blocks.{i}'
        y = ref_layer_norm(x, sd, f'{name}.norm1')
        if i in global_blocks:
            y = ref_attention(y, sd, f'{name}.attn', heads)
        else:
            y = ref_windowed(y, sd, f'{name}.attn', heads, window)
        x = x + y
        y = ref_layer_norm(x, sd, f'{name}.norm2')
        y = F.gelu(y @ sd[f'{name}.mlp.fc1.weight'].t()
                   + sd[f'{name}.mlp.fc1.bias'])
        x = x + (y @ sd[f'{name}.mlp.fc2.weight'].t()
                 + sd[f'{name}.mlp.fc2.bias'])
    return x.permute(2, 0, 1)


# ----------------------------------------------------------------------
# Parity.
@pytest.fixture(scope='module')
def vitdet_and_state():
    # NOTE: the global blocks' tables are sized for 320 (39 rows), the
    # windowed blocks' for the window (27 rows): both are resized by the
    # reference at grids other than their own.
    model = randomize(windowed_vit(rel_pos_img_size=320)).eval()
    return model, vit_state(model)


@pytest.mark.parametrize('size', DETECTION_SIZES,
                         ids=lambda s: f'{s[0]}x{s[1]}')
def test_windowed_vit_equals_vitdets_reference(vitdet_and_state, size):
    model, sd = vitdet_and_state
    assert tuple(sd['blocks.0.attn.rel_pos_h'].shape) == (27, 32)
    assert tuple(sd['blocks.1.attn.rel_pos_h'].shape) == (39, 32)
    torch.manual_seed(1)
    images = torch.rand(2, 3, *size)
    with torch.no_grad():
        out, = model(images)
    assert tuple(out.shape) == (2, 64, size[0] // 16, size[1] // 16)
    for k in range(2):
        ref = ref_vitdet(images[k], sd, heads=2, window=14,
                         global_blocks=(1, 3))
        assert max_abs_diff(out[k], ref) <= 1e-5


def test_odd_input_is_padded_to_the_patch_and_cropped(vitdet_and_state):
    """A 333x517 image is zero-padded to 336x528 (the patch), as mmdet's
    padding does: the map is the padded image's, ceil(H/16) x ceil(W/16)."""
    model, sd = vitdet_and_state
    image = torch.rand(1, 3, 333, 517)
    with torch.no_grad():
        out, = model(image)
    padded = F.pad(image, (0, 528 - 517, 0, 336 - 333))[0]
    ref = ref_vitdet(padded, sd, heads=2, window=14, global_blocks=(1, 3))
    assert tuple(out.shape) == (1, 64, 21, 33)
    assert max_abs_diff(out[0], ref) <= 1e-5


def test_windowed_vit_equals_timms_samvit_at_its_pretraining_size():
    """timm's SAM-ViT is ViTDet's ViT (window attention, global blocks,
    decomposed relative positions); at its pretraining size its position
    embedding is not resized, and the two agree."""
    # NOTE: timm's SAM-ViT normalises with eps 1e-5, ViT and ViTDet 1e-6.
    sam = timm.create_model('samvit_base_patch16', img_size=224,
                            window_size=7, global_attn_indexes=(1, 3),
                            use_rel_pos=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                            **TINY).eval()
    randomize(sam, seed=3, rel_scale=0.1)
    model = windowed_vit(window_size=7).eval()
    state = {}
    for key, value in sam.state_dict().items():
        if key.startswith(('neck.', 'head.')):
            continue
        if key == 'pos_embed':  # SAM: (1, 14, 14, C), no class slot
            value = torch.cat([torch.zeros(1, 1, value.shape[-1]),
                               value.reshape(1, -1, value.shape[-1])], 1)
        state[f'body.model.{key}'] = value
    model.load_state_dict(state, strict=True)
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        ours, = model(image)
        ref = sam.forward_intermediates(image, indices=[3],
                                        intermediates_only=True)[0]
    assert max_abs_diff(ours, ref) <= 1e-5


class _PerWindow(torch.nn.Module):
    """timm's own EVA attention run on each window, with RoPE for the
    window's grid: the oracle of the windowed EVA blocks."""

    def __init__(self, attn, rope, window):
        super().__init__()
        self.attn, self.window = attn, window
        self.__dict__['rope'] = rope
        attn.num_prefix_tokens = 0

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        b, h, w, c = x.shape
        size = self.window or None
        if size is None:
            embed = self.rope.get_embed(shape=[h, w])
            return self.attn(x.reshape(b, h * w, c), rope=embed).reshape(
                b, h, w, c)
        hp, wp = math.ceil(h / size) * size, math.ceil(w / size) * size
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        out = torch.empty_like(x)
        embed = self.rope.get_embed(shape=[size, size])
        for top in range(0, hp, size):
            for left in range(0, wp, size):
                win = x[:, top:top + size, left:left + size]
                out[:, top:top + size, left:left + size] = self.attn(
                    win.reshape(b, size * size, c), rope=embed).reshape(
                        b, size, size, c)
        return out[:, :h, :w]


@pytest.mark.parametrize('model_name', ['eva02_tiny_patch14_224',
                                        'vit_small_patch16_dinov3'])
def test_windowed_eva_equals_timms_attention_per_window(model_name):
    """EVA-02 and DINOv3 (RoPE): each windowed block equals timm's own
    attention run per window with RoPE made for the window's grid (as
    EVA-02's detector does), each global block timm's attention with RoPE
    for the whole grid."""
    kwargs = dict(embed_dim=64, depth=3, num_heads=2)
    model = VBTimmBackbone(model_name, model_kwargs=kwargs, window_size=4,
                           global_blocks=(1, ), pyramid=None,
                           levels='timm').eval()
    randomize(model, seed=5)
    ref = timm.create_model(model_name, dynamic_img_size=True,
                            **kwargs).eval()
    missing = ref.load_state_dict(vit_state(model), strict=False)
    assert set(missing.missing_keys) <= {'cls_token', 'reg_token', 'norm.weight',
                                         'norm.bias', 'head.weight',
                                         'head.bias', 'fc_norm.weight',
                                         'fc_norm.bias'}
    assert not missing.unexpected_keys
    for i, block in enumerate(ref.blocks):
        block.attn = _PerWindow(block.attn, ref.rope, 0 if i == 1 else 4)
    patch = ref.patch_embed.patch_size[0]
    image = torch.rand(1, 3, 9 * patch, 13 * patch)
    with torch.no_grad():
        outs = model(image)
        x = ref.patch_embed.proj(image).permute(0, 2, 3, 1)
        if ref.pos_embed is not None:
            pos = ref.pos_embed[:, ref.num_prefix_tokens:]
            side = int(math.sqrt(pos.shape[1]))
            pos = F.interpolate(pos.reshape(1, side, side, -1).permute(
                0, 3, 1, 2), size=(9, 13), mode='bicubic',
                align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        expected = []
        for block in ref.blocks:
            x = block(x)
            expected.append(x.permute(0, 3, 1, 2))
    assert len(outs) == 3
    assert max_abs_diff(list(outs), expected) <= 1e-5


# ----------------------------------------------------------------------
# Options.
def test_vitdets_global_blocks_by_depth():
    """ViTDet's global blocks: B 2, 5, 8, 11; L 5, 11, 17, 23; H 7, 15,
    23, 31 (Li et al. 2022)."""
    assert default_global_blocks(12) == (2, 5, 8, 11)
    assert default_global_blocks(24) == (5, 11, 17, 23)
    assert default_global_blocks(32) == (7, 15, 23, 31)
    model = VBTimmBackbone('vit_base_patch16_224', window_size=14,
                           rel_pos=True, pyramid=None, out_indices=(3, ),
                           model_kwargs=dict(embed_dim=32, num_heads=2))
    sizes = [b.attn.window_size for b in model.body.model.blocks]
    assert sizes == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    tables = [tuple(b.attn.rel_pos_h.shape) for b in model.body.model.blocks]
    assert tables[:3] == [(27, 16), (27, 16), (27, 16)]
    built_1024 = VBTimmBackbone(
        'vit_base_patch16_224', window_size=14, rel_pos=True,
        rel_pos_img_size=1024, pyramid=None, out_indices=(3, ),
        model_kwargs=dict(embed_dim=32, num_heads=2))
    block = built_1024.body.model.blocks[2].attn
    assert tuple(block.rel_pos_h.shape) == (127, 16)  # ViTDet-B's tables


def test_windowed_form_has_no_prefix_tokens_and_zero_tables():
    model = windowed_vit(model_name='vit_small_patch14_reg4_dinov2',
                         model_kwargs=dict(TINY, img_size=98),
                         window_size=4)
    vit = model.body.model
    assert vit.cls_token is None and vit.reg_token is None
    names = [n for n, _ in model.named_parameters()]
    assert not any('cls_token' in n or 'reg_token' in n for n in names)
    assert all(float(p.abs().max()) == 0 for n, p in
               model.named_parameters() if 'rel_pos' in n)
    out, = model.eval()(torch.rand(1, 3, 70, 126))
    assert tuple(out.shape) == (1, 64, 5, 9)


def test_windowed_form_is_off_by_default():
    model = VBTimmBackbone('vit_tiny_patch16_224', pyramid=None,
                           out_indices=(3, ),
                           model_kwargs=dict(depth=4, embed_dim=32,
                                             num_heads=2))
    assert not model.window_plan.enabled
    assert model.body.model.cls_token is not None
    assert not any('rel_pos' in n for n, _ in model.named_parameters())


@pytest.mark.parametrize('kwargs,error,message', [
    (dict(model_name='resnet18', model_kwargs=None, window_size=7),
     ValueError,
     "the windowed form (window_size, rel_pos) is for plain ViTs: timm "
     "modules ('vision_transformer', 'deit', 'eva') (ViT, DeiT, DeiT-III, "
     "MAE, DINOv2, EVA-02, DINOv3); 'resnet18' is a ResNet of timm module "
     "'resnet'"),
    (dict(window_size=-2), ValueError,
     'window_size=-2 is not valid; use an int >= 0 (0: every block attends '
     'globally)'),
    (dict(window_size=7.0), TypeError,
     'window_size must be an int >= 0, got 7.0 (float)'),
    (dict(rel_pos='yes'), TypeError,
     "rel_pos must be a bool, got 'yes' (str)"),
    (dict(global_blocks=(1, 9)), ValueError,
     "global_blocks=[1, 9]: [9] out of range; 'vit_base_patch16_224' has "
     'blocks 0..3'),
    (dict(window_size=0, rel_pos=False, global_blocks=(1, )), ValueError,
     'global_blocks=[1] needs window_size > 0 (with window_size=0 every '
     'block is global)'),
    (dict(rel_pos=False, rel_pos_img_size=1024), ValueError,
     'rel_pos_img_size=1024 needs rel_pos=True'),
    (dict(rel_pos_img_size=0), ValueError,
     "rel_pos_img_size=0 is not valid; use a positive int or None (the "
     "model's img_size)"),
])
def test_bad_window_options_are_refused(kwargs, error, message):
    with pytest.raises(error) as err:
        windowed_vit(**kwargs)
    assert str(err.value) == message


def test_swin_is_refused_with_what_is_supported():
    with pytest.raises(ValueError, match=r"'swin_tiny_patch4_window7_224' is "
                       r"a SwinTransformer of timm module "
                       r"'swin_transformer'"):
        VBTimmBackbone('swin_tiny_patch4_window7_224', window_size=7)


# ----------------------------------------------------------------------
# Checkpoints.
def test_detectron2_vitdet_layout_loads_strictly(tmp_path):
    """detectron2's model-zoo layout: the ViT under backbone.net., the
    pyramid under backbone.simfp_*, the heads outside backbone."""
    source = randomize(windowed_vit(), seed=7)
    state = {f'backbone.net.{k}': v.numpy()
             for k, v in vit_state(source).items()}
    state['backbone.simfp_2.0.weight'] = np.zeros((64, 32, 2, 2), 'f4')
    state['roi_heads.box_predictor.cls_score.weight'] = np.zeros((81, 8),
                                                                 'f4')
    path = tmp_path / 'model_final.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'model': state, '__author__': 'test'}, f)
    model = windowed_vit()
    report = load_pretrained(model, str(path), verbose=False)
    assert report.source == 'detectron2-vitdet'
    assert report.dropped == {
        "outside prefix 'backbone.'": [
            'roi_heads.box_predictor.cls_score.weight'],
        'the simple feature pyramid (VBSimpleFeaturePyramid loads it)': [
            'simfp_2.0.weight']}
    assert report.kept_initial == []
    image = torch.rand(1, 3, 160, 224)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(image), source.eval()(image)) == 0





def test_mmdet_vitdet_layout_loads_strictly(save_state):
    source = randomize(windowed_vit(), seed=8)
    state = {f'backbone.{k}': v for k, v in vit_state(source).items()}
    state['neck.fpn1.0.weight'] = torch.zeros(64, 32, 2, 2)
    path = save_state({'state_dict': state, 'meta': {}})
    model = windowed_vit()
    report = load_pretrained(model, str(path), verbose=False)
    assert report.source == 'mmdet-vitdet'
    assert report.dropped == {"outside prefix 'backbone.'":
                              ['neck.fpn1.0.weight']}
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_mae_checkpoint_reports_new_tables_and_dropped_class_token(
        save_state):
    """An MAE / timm ViT checkpoint: the windowing's tables are newly
    initialised, the class token dropped, both reported."""
    vit = timm.create_model('vit_base_patch16_224', **TINY)
    path = save_state({'model': vit.state_dict()})
    model = windowed_vit()
    report = load_pretrained(model, str(path), verbose=False)
    assert report.source == 'timm'
    assert sorted(report.kept_initial) == sorted(
        f'body.model.blocks.{i}.attn.rel_pos_{a}' for i in range(4)
        for a in 'hw')
    assert report.dropped['prefix tokens (the windowed form has none, as '
                          'ViTDet)'] == ['cls_token']
    assert torch.equal(model.body.model.pos_embed, vit.pos_embed)
    assert torch.equal(model.body.model.blocks[2].attn.qkv.weight,
                       vit.blocks[2].attn.qkv.weight)


def test_dinov2_official_layout_loads_into_the_windowed_form(save_state):
    """DINOv2's official release layout (register_tokens, mask_token) goes
    through timm's filter; the registers and class token are dropped."""
    kwargs = dict(TINY, img_size=98)
    vit = timm.create_model('vit_small_patch14_reg4_dinov2', **kwargs)
    official = {}
    for key, value in vit.state_dict().items():
        if key.startswith('head.'):
            continue
        official[{'reg_token': 'register_tokens'}.get(key, key)] = value
    # The release's position embedding has a class slot; timm's has none.
    official['pos_embed'] = torch.cat([torch.zeros(1, 1, 64),
                                       vit.pos_embed], 1)
    official['mask_token'] = torch.zeros(1, 64)
    path = save_state(official, 'dinov2_vits14_reg4_pretrain.pth')
    model = windowed_vit(model_name='vit_small_patch14_reg4_dinov2',
                         model_kwargs=kwargs, window_size=4)
    report = load_pretrained(model, str(path), verbose=False)
    assert report.source == 'timm'
    assert sorted(report.dropped['prefix tokens (the windowed form has '
                                 'none, as ViTDet)']) == ['cls_token',
                                                         'reg_token']
    assert len(report.kept_initial) == 8
    assert torch.equal(model.body.model.blocks[1].ls1.gamma,
                       vit.blocks[1].ls1.gamma)


def test_eva02_checkpoint_loads_into_the_windowed_form(save_state):
    kwargs = dict(embed_dim=64, depth=4, num_heads=2)
    eva = timm.create_model('eva02_tiny_patch14_224', **kwargs)
    path = save_state(eva.state_dict())
    model = VBTimmBackbone('eva02_tiny_patch14_224', model_kwargs=kwargs,
                           window_size=4, rel_pos=True, pyramid=None,
                           out_indices=(3, ))
    report = load_pretrained(model, str(path), verbose=False)
    assert len(report.kept_initial) == 8
    assert torch.equal(model.body.model.blocks[0].attn.q_bias,
                       eva.blocks[0].attn.q_bias)


# ----------------------------------------------------------------------
# Training, layer decay, export.
def test_layer_decay_puts_the_tables_in_their_blocks_group():
    model = windowed_vit()
    assert model.lr_decay_num_layers == 4
    assert model.lr_decay_layer_id('body.model.pos_embed') == 0
    assert model.lr_decay_layer_id('body.model.patch_embed.proj.weight') == 0
    for i in range(4):
        assert model.lr_decay_layer_id(
            f'body.model.blocks.{i}.attn.rel_pos_h') == i + 1


def test_windowed_training_step_reaches_every_parameter():
    model = randomize(windowed_vit(drop_path_rate=0.1, with_cp=True))
    model.train()
    out, = model(torch.rand(2, 3, 96, 160))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if 'rel_pos' in name or 'pos_embed' in name:
            assert float(p.grad.abs().max()) > 0, name


def test_frozen_stages_freeze_the_tables_with_their_blocks():
    model = windowed_vit(frozen_stages=1).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert 'body.model.blocks.0.attn.rel_pos_h' in frozen
    assert 'body.model.pos_embed' in frozen
    assert 'body.model.blocks.1.attn.rel_pos_h' not in frozen


def test_windowed_vit_exports_with_dynamic_size():
    """ONNX with a dynamic height and width: export_onnx checks the file
    against the model at two sizes; here a third, non-multiple of the
    window."""
    ort = pytest.importorskip('onnxruntime')
    model = randomize(windowed_vit(window_size=4)).eval()
    exp = export_onnx(model, example_input=torch.rand(1, 3, 96, 160))
    assert len(exp.checks) >= 2
    x = torch.rand(1, 3, 208, 112)
    outs = ort.InferenceSession(exp.model).run(None, {'input': x.numpy()})
    with torch.no_grad():
        ref, = model(x)
    assert max_abs_diff(ref, torch.from_numpy(outs[0])) <= 1e-4


# ----------------------------------------------------------------------
# In mmdet's Mask R-CNN, with ViTDet's neck.
TOY_VITDET = (Path(__file__).resolve().parents[1]
              / 'configs/mask_rcnn/mask-rcnn_vb-vitdet-tiny_toy.py')


@pytest.fixture(scope='module')
def toy_vitdet():
    from vb_plugin.apis import build_detector, load_config
    cfg = load_config(str(TOY_VITDET))
    return cfg, build_detector(cfg, pretrained=False)


def test_windowed_vit_trains_in_mmdets_mask_rcnn(toy_vitdet):
    """mmdet's Mask R-CNN built through mmdet's registry from the toy
    ViTDet config: the neck's in_channels='auto' wired from the backbone,
    strides 4..64 for mmdet's RPN and RoI heads, one training step at a
    non-square size with every loss finite."""
    from conftest import checked_train_step
    from vb_plugin.apis import synthetic_detection_batch
    cfg, model = toy_vitdet
    assert type(model).__name__ == 'MaskRCNN'
    assert type(model.neck).__name__ == 'VBSimpleFeaturePyramid'
    assert model.backbone.out_channels == (96, )
    assert model.backbone.out_strides == (16, )
    assert list(cfg.model.neck.in_channels) == [96]
    batch = synthetic_detection_batch(num_images=2, size=(160, 224),
                                      num_classes=3)
    data = model.data_preprocessor(batch, training=False)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (40, 56), (20, 28), (10, 14), (5, 7), (3, 4)]
    assert all(f.shape[1] == 64 for f in feats)
    losses, preds, _ = checked_train_step(model, batch)
    assert len(preds) == 2


def test_layer_decay_groups_per_block(toy_vitdet):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    cfg, model = toy_vitdet
    init_default_scope('mmdet')
    optim_cfg = cfg.optim_wrapper.copy()
    optim = build_optim_wrapper(model, optim_cfg)
    base_lr, rate, n = 2e-4, 0.7, 4
    group_of = {id(p): g for g in optim.optimizer.param_groups
                for p in g['params']}
    params = dict(model.named_parameters())
    for name, layer_id in [
        ('backbone.body.model.pos_embed', 0),
        ('backbone.body.model.patch_embed.proj.weight', 0),
        ('backbone.body.model.blocks.0.attn.rel_pos_h', 1),
        ('backbone.body.model.blocks.2.attn.qkv.weight', 3),
        ('backbone.body.model.blocks.3.attn.rel_pos_w', 4),
        ('neck.levels.p4.0.weight', 5),
    ]:
        assert group_of[id(params[name])]['lr'] == pytest.approx(
            base_lr * rate**(n + 1 - layer_id), rel=1e-12), name
