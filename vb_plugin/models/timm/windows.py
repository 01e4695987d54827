"""ViTDet's windowed form of a plain timm ViT: window attention, decomposed
relative positions, and the absolute position embedding without prefix
tokens.

Li et al., "Exploring Plain Vision Transformer Backbones for Object
Detection" (ViTDet, ECCV 2022), and detectron2's documented behaviour:

* most blocks attend inside non-overlapping ``window_size`` x
  ``window_size`` windows of the token grid, which is zero-padded at the
  bottom and right to a multiple of the window and cropped back after the
  attention; a few **global blocks** attend over the whole grid (by default
  four evenly spaced ones: 2, 5, 8, 11 for 12 blocks);
* with ``rel_pos``, every attention adds ViTDet's decomposed relative
  positions: per block, tables ``rel_pos_h`` and ``rel_pos_w`` of
  ``2 * size - 1`` rows (``size``: the window, or the grid of the model's
  ``img_size`` in global blocks), zero-initialised, linearly resized to
  ``2 * size - 1`` rows for a grid of another size; the query (unscaled)
  times the table row of each height and width offset is added to the
  attention logits;
* the pretrained absolute position embedding, without its prefix (class,
  register) slots, is resized to the token grid with plain bicubic
  interpolation (``align_corners=False``, no antialias), and prefix tokens
  are not used (their parameters are removed);
* EVA-style models (timm's ``eva`` module: EVA-02, DINOv3) compute their
  rotary embedding (RoPE) for the grid each attention sees: a window's in
  windowed blocks (as EVA-02's detector does), the whole grid in global
  blocks.

Blocks run on ``(B, H, W, C)`` tokens (timm's blocks are per-token apart
from their attention), so the grid is read from shapes and the form traces
to ONNX with any input size. The attention keeps timm's parameters and
names (``attn.qkv``, ``attn.proj``, ...) and adds ``attn.rel_pos_h`` and
``attn.rel_pos_w``: the names detectron2's and mmdet's ViTDet checkpoints
use.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

#: timm modules whose models take the windowed form.
WINDOW_MODULES = ('vision_transformer', 'deit', 'eva')
#: timm model classes (and subclasses) that take it.
WINDOW_MODELS = (VisionTransformer, Eva)
#: timm attentions it replaces (exactly these classes).
WINDOW_ATTENTIONS = (Attention, EvaAttention)


def default_global_blocks(depth: int) -> Tuple[int, ...]:
    """ViTDet's global blocks for ``depth`` blocks: the last of each
    quarter.

    Example:
        >>> default_global_blocks(12), default_global_blocks(24)
        ((2, 5, 8, 11), (5, 11, 17, 23))
        >>> default_global_blocks(32)
        (7, 15, 23, 31)
    """
    return tuple((k + 1) * depth // 4 - 1 for k in range(4))


@dataclass(frozen=True)
class WindowPlan:
    """The windowed form of one model: ``window_size`` (0: no windows),
    the ``global_blocks``, ``rel_pos`` and the grid of ``rel_pos_grid``
    the global blocks' tables are sized for."""
    window_size: int = 0
    global_blocks: Tuple[int, ...] = ()
    rel_pos: bool = False
    rel_pos_grid: Tuple[int, int] = (0, 0)

    @property
    def new_layer_patterns(self) -> Tuple[str, ...]:
        """The parameters the form adds (no timm checkpoint has them)."""
        return (r'\.attn\.rel_pos_[hw]$', ) if self.rel_pos else ()

    @property
    def enabled(self) -> bool:
        """Whether the model runs in the windowed form (windows or
        relative positions asked for)."""
        return self.window_size > 0 or self.rel_pos


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_window_options(window_size, global_blocks, rel_pos,
                         rel_pos_img_size) -> None:
    """Raise ``TypeError``/``ValueError`` for options of the windowed form
    that no model takes.

    Example:
        >>> check_window_options(14, None, True, 1024)
        >>> check_window_options(-1, None, False, None)
        Traceback (most recent call last):
        ...
        ValueError: window_size=-1 is not valid; use an int >= 0 (0: every block attends globally)
    """
    if not _is_int(window_size):
        raise TypeError(f'window_size must be an int >= 0, got '
                        f'{window_size!r} ({type(window_size).__name__})')
    if window_size < 0:
        raise ValueError(f'window_size={window_size!r} is not valid; use an '
                         'int >= 0 (0: every block attends globally)')
    if not isinstance(rel_pos, bool):
        raise TypeError(f'rel_pos must be a bool, got {rel_pos!r} '
                        f'({type(rel_pos).__name__})')
    if global_blocks is not None:
        if not isinstance(global_blocks, (list, tuple)) or not all(
                _is_int(i) for i in global_blocks):
            raise TypeError(f'global_blocks must be a list of block indices '
                            f'(ints) or None, got {global_blocks!r}')
        if window_size == 0:
            raise ValueError(
                f'global_blocks={list(global_blocks)} needs window_size > 0 '
                '(with window_size=0 every block is global)')
    if rel_pos_img_size is not None:
        if not _is_int(rel_pos_img_size) or rel_pos_img_size <= 0:
            raise ValueError(f'rel_pos_img_size={rel_pos_img_size!r} is not '
                             'valid; use a positive int or None (the '
                             "model's img_size)")
        if not rel_pos:
            raise ValueError(f'rel_pos_img_size={rel_pos_img_size!r} needs '
                             'rel_pos=True')


def plan_windows(create_model: Callable[[], nn.Module], model_name: str,
                 timm_module: str, window_size: int = 0,
                 global_blocks: Optional[Sequence[int]] = None,
                 rel_pos: bool = False,
                 rel_pos_img_size: Optional[int] = None) -> WindowPlan:
    """The :class:`WindowPlan` for these options of the model that
    ``create_model`` makes (the whole timm model, on any device; made only
    when the options ask for the windowed form).

    Raises:
        TypeError, ValueError: As :func:`check_window_options`;
            ``ValueError`` also for a model that is not a plain timm ViT
            (``WINDOW_MODULES``) and for block indices out of range.

    Example:
        >>> import timm
        >>> make = lambda: timm.create_model('vit_tiny_patch16_224', depth=6)
        >>> plan_windows(make, 'vit_tiny_patch16_224', 'vision_transformer',
        ...              window_size=7, rel_pos=True)
        WindowPlan(window_size=7, global_blocks=(0, 2, 3, 5), rel_pos=True, rel_pos_grid=(14, 14))
    """
    check_window_options(window_size, global_blocks, rel_pos,
                         rel_pos_img_size)
    plan = WindowPlan(window_size, (), rel_pos)
    if not plan.enabled:
        return plan
    model = create_model()
    supported = (f'the windowed form (window_size, rel_pos) is for plain '
                 f'ViTs: timm modules {WINDOW_MODULES} (ViT, DeiT, DeiT-III, '
                 'MAE, DINOv2, EVA-02, DINOv3)')
    if timm_module not in WINDOW_MODULES or not isinstance(
            model, WINDOW_MODELS):
        raise ValueError(f'{supported}; {model_name!r} is a '
                         f'{type(model).__name__} of timm module '
                         f'{timm_module!r}')
    blocks = model.blocks
    others = sorted({type(b.attn).__name__ for b in blocks
                     if type(b.attn) not in WINDOW_ATTENTIONS})
    if others:
        raise ValueError(f'{supported}, whose blocks use timm\'s '
                         f'{[c.__name__ for c in WINDOW_ATTENTIONS]}; '
                         f'{model_name!r} uses {others}')
    drop = getattr(model, 'patch_drop', None)
    if drop is not None and float(getattr(drop, 'prob', 0.0)) > 0:
        raise ValueError(f'{supported}; {model_name!r} drops patches '
                         '(patch_drop_rate), which leaves no token grid')
    depth = len(blocks)
    if global_blocks is None:
        global_blocks = default_global_blocks(depth) if window_size else ()
    bad = [i for i in global_blocks if not 0 <= i < depth]
    if bad:
        raise ValueError(f'global_blocks={list(global_blocks)}: {bad} out of '
                         f'range; {model_name!r} has blocks 0..{depth - 1}')
    patch = model.patch_embed.patch_size
    grid = tuple(model.patch_embed.grid_size)
    if rel_pos_img_size is not None:
        grid = (rel_pos_img_size // patch[0], rel_pos_img_size // patch[1])
    return WindowPlan(window_size, tuple(sorted(set(global_blocks))),
                      rel_pos, grid if rel_pos else (0, 0))


# ----------------------------------------------------------------------
# The pieces of ViTDet's attention.
def window_partition(x: torch.Tensor, size: int
                     ) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``(B, H, W, C)`` tokens, zero-padded at the bottom and right to
    multiples of ``size``, as ``(B * windows, size, size, C)``, and the
    padded grid.

    Example:
        >>> w, padded = window_partition(torch.rand(2, 5, 9, 3), 4)
        >>> tuple(w.shape), padded
        ((12, 4, 4, 3), (8, 12))
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // size, size, wp // size, size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, size: int,
                       padded: Tuple[int, int],
                       grid: Tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`window_partition`, cropped to ``grid``.

    Example:
        >>> x = torch.rand(2, 5, 9, 3)
        >>> w, padded = window_partition(x, 4)
        >>> bool((window_unpartition(w, 4, padded, (5, 9)) == x).all())
        True
    """
    hp, wp = padded
    c = windows.shape[-1]
    x = windows.view(-1, hp // size, wp // size, size, size, c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
    return x[:, :grid[0], :grid[1]]


def relative_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of a relative position table for every (query, key) pair of
    ``size`` positions, ``(size, size, dim)``: the table is first linearly
    resized to ``2 * size - 1`` rows when it has another length.

    Example:
        >>> t = torch.arange(5.).view(5, 1)
        >>> relative_table(t, 3)[..., 0].tolist()
        [[2.0, 1.0, 0.0], [3.0, 2.0, 1.0], [4.0, 3.0, 2.0]]
        >>> tuple(relative_table(t, 4).shape)
        (4, 4, 1)
    """
    length = 2 * size - 1
    # NOTE: traced for ONNX, the resize is always recorded (the grid is an
    # input; at the table's own length it is the identity).
    if table.shape[0] != length or torch.jit.is_tracing():
        table = F.interpolate(table.t().unsqueeze(0), size=length,
                              mode='linear', align_corners=False)[0].t()
    pos = torch.arange(size, device=table.device)
    return table[pos[:, None] - pos[None, :] + (size - 1)]


def decomposed_rel_pos(q: torch.Tensor, table_h: torch.Tensor,
                       table_w: torch.Tensor, grid: Tuple[int, int]
                       ) -> torch.Tensor:
    """ViTDet's decomposed relative position term of the attention logits,
    ``(B, heads, H * W, H * W)``, for queries ``q`` ``(B, heads, H * W,
    dim)`` on a grid of ``grid`` (keys on the same grid).

    Example:
        >>> q = torch.rand(2, 3, 4 * 5, 8)
        >>> tuple(decomposed_rel_pos(q, torch.zeros(7, 8), torch.zeros(9, 8),
        ...                          (4, 5)).shape)
        (2, 3, 20, 20)
    """
    b, n, _, dim = q.shape
    h, w = grid
    rq = q.reshape(b, n, h, w, dim)
    rel_h = torch.einsum('bnhwc,hkc->bnhwk', rq, relative_table(table_h, h))
    rel_w = torch.einsum('bnhwc,wkc->bnhwk', rq, relative_table(table_w, w))
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(
        b, n, h * w, h * w)


class WindowAttention(nn.Module):
    """A timm attention (:data:`WINDOW_ATTENTIONS`) in ViTDet's form: on
    ``(B, H, W, C)`` tokens, inside windows (``window_size > 0``) or
    global, with decomposed relative positions (``rel_pos_size``) and RoPE
    for the grid it sees (``rope``: the model's rotary embedding module, for
    EVA-style models).

    It takes over the attention's parameters, buffers and layers under
    their own names (``qkv``, ``proj``, ...), and adds ``rel_pos_h`` and
    ``rel_pos_w`` (zero-initialised) when ``rel_pos_size`` is given.

    Example:
        >>> from timm.layers.attention import Attention
        >>> attn = WindowAttention(Attention(32, num_heads=2), 4, (4, 4))
        >>> tuple(attn(torch.rand(1, 6, 9, 32)).shape)
        (1, 6, 9, 32)
        >>> tuple(attn.rel_pos_h.shape)
        (7, 16)
    """

    def __init__(self, attn: nn.Module, window_size: int,
                 rel_pos_size: Optional[Tuple[int, int]] = None,
                 rope: Optional[nn.Module] = None,
                 block_index: int = 0) -> None:
        if type(attn) not in WINDOW_ATTENTIONS:
            raise TypeError(f'WindowAttention takes one of '
                            f'{[c.__name__ for c in WINDOW_ATTENTIONS]}, got '
                            f'{type(attn).__name__}')
        super().__init__()
        # NOTE: the timm attention's state, under its own names.
        self._parameters.update(attn._parameters)
        self._buffers.update(attn._buffers)
        self._non_persistent_buffers_set.update(
            attn._non_persistent_buffers_set)
        self._modules.update(attn._modules)
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scale
        self.qkv_fused = getattr(attn, 'qkv', None) is not None
        self.rotate_half = bool(getattr(attn, 'rotate_half', False))
        self.window_size = int(window_size)
        self.block_index = block_index
        # NOTE: the model's rotary embedding stays the model's child; held
        # here outside the module tree (not a second copy of its state).
        self.__dict__['rope'] = rope
        if rel_pos_size is not None:
            dim = attn.head_dim
            self.rel_pos_h = nn.Parameter(
                torch.zeros(2 * rel_pos_size[0] - 1, dim))
            self.rel_pos_w = nn.Parameter(
                torch.zeros(2 * rel_pos_size[1] - 1, dim))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def extra_repr(self) -> str:
        return (f'window_size={self.window_size}, '
                f'rel_pos={self.rel_pos_h is not None}')

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        b, n, _ = x.shape
        if self.qkv_fused:
            bias = self.qkv.bias
            if getattr(self, 'q_bias', None) is not None:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias)
            # NOTE: the head size written out, not -1: traced for ONNX
            # after EVA's bias concatenation, -1 was recorded as 1.
            q, k, v = qkv.reshape(b, n, 3, self.num_heads,
                                  self.head_dim).permute(2, 0, 3, 1,
                                                         4).unbind(0)
        else:
            q, k, v = (p(x).reshape(b, n, self.num_heads,
                                    self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.q_norm(q), self.k_norm(k), v

    def _rope(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        if self.rope is None:
            return None
        embed = self.rope.get_embed(shape=list(grid))
        # NOTE: timm's 'mixed' RoPE learns one embedding per block.
        return embed[self.block_index] if embed.ndim == 3 else embed

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """``(B, H, W, C)`` tokens to ``(B, H, W, C)``. ``rope``,
        ``attn_mask`` and ``is_causal`` are what timm's blocks pass; the
        form makes its own RoPE and has no mask."""
        grid = (x.shape[1], x.shape[2])
        if self.window_size:
            x, padded = window_partition(x, self.window_size)
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        gate = getattr(self, 'gate', None)
        gate = gate(tokens).sigmoid() if gate is not None else None
        q, k, v = self._qkv(tokens)
        embed = self._rope((h, w))
        if embed is not None:
            q = apply_rot_embed_cat(q, embed, half=self.rotate_half).type_as(v)
            k = apply_rot_embed_cat(k, embed, half=self.rotate_half).type_as(v)
        bias = None
        if self.rel_pos_h is not None:
            bias = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w,
                                      (h, w))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.)
        out = self.norm(out.transpose(1, 2).reshape(
            b, h * w, self.num_heads * self.head_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out)).reshape(b, h, w, -1)
        if self.window_size:
            out = window_unpartition(out, self.window_size, padded, grid)
        return out


def install_windows(model: nn.Module, plan: WindowPlan) -> None:
    """Put ``model`` (a timm ViT, possibly with its last blocks pruned) in
    the windowed form of ``plan``: each block's attention becomes a
    :class:`WindowAttention`, and the prefix tokens are removed.

    Example:
        >>> import timm
        >>> m = timm.create_model('vit_tiny_patch16_224', depth=2)
        >>> install_windows(m, WindowPlan(7, (1, ), True, (14, 14)))
        >>> [b.attn.window_size for b in m.blocks], m.cls_token
        ([7, 0], None)
    """
    rope = getattr(model, 'rope', None)
    for i, block in enumerate(model.blocks):
        size = 0 if i in plan.global_blocks else plan.window_size
        rel = None
        if plan.rel_pos:
            rel = (size, size) if size else plan.rel_pos_grid
        block.attn = WindowAttention(block.attn, size, rel, rope, i)
    # NOTE: as ViTDet, no class (register, distillation) token: the
    # windowed blocks have no place for them.
    for name in ('cls_token', 'reg_token', 'dist_token'):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def prefix_slots(model: nn.Module) -> int:
    """Slots of the prefix tokens at the start of ``model.pos_embed``."""
    return 0 if getattr(model, 'no_embed_class', False) else int(
        model.num_prefix_tokens)


def grid_position_embed(model: nn.Module, grid: Tuple[int, int]
                        ) -> Optional[torch.Tensor]:
    """``model.pos_embed`` without its prefix slots, resized to ``grid``
    with plain bicubic interpolation, as ``(1, H, W, C)``; None when the
    model has none.

    Example:
        >>> import timm
        >>> m = timm.create_model('vit_tiny_patch16_224', depth=1)
        >>> tuple(grid_position_embed(m, (5, 7)).shape)
        (1, 5, 7, 192)
    """
    pos = getattr(model, 'pos_embed', None)
    if pos is None:
        return None
    pos = pos[:, prefix_slots(model):]
    gh, gw = model.patch_embed.grid_size
    pos = pos.reshape(1, gh, gw, -1)
    if (gh, gw) == tuple(grid) and not torch.jit.is_tracing():
        return pos
    pos = F.interpolate(pos.permute(0, 3, 1, 2), size=tuple(grid),
                        mode='bicubic', align_corners=False)
    return pos.permute(0, 2, 3, 1)


def windowed_features(body: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The outputs (NCHW) of the blocks ``body.out_indices`` of the timm
    extractor ``body`` (``features_only``, its model in the windowed form)
    for the input ``x``, whose size is a multiple of the patch.

    Example:
        >>> import timm
        >>> body = timm.create_model('vit_tiny_patch16_224', depth=2,
        ...                          features_only=True, out_indices=(1, ),
        ...                          dynamic_img_size=True)
        >>> install_windows(body.model, WindowPlan(7, (1, ), True, (14, 14)))
        >>> [tuple(o.shape) for o in windowed_features(body,
        ...                                          torch.rand(1, 3, 160, 96))]
        [(1, 192, 10, 6)]
    """
    model = body.model
    b, _, height, width = x.shape
    x = model.patch_embed(x)
    if x.ndim == 3:
        grid = model.patch_embed.dynamic_feat_size((height, width))
        x = x.reshape(b, grid[0], grid[1], -1)
    pos = grid_position_embed(model, (x.shape[1], x.shape[2]))
    if pos is not None:
        x = x + pos
    x = model.norm_pre(model.pos_drop(x))
    take = set(body.out_indices)
    outs = []
    use_cp = getattr(model, 'grad_checkpointing', False)
    for i, block in enumerate(model.blocks):
        if use_cp and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
        if i in take:
            outs.append(x.permute(0, 3, 1, 2).contiguous())
    return outs
