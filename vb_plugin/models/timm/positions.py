"""Position state made for the pretraining grid, made for each input's.

Many timm models carry state sized for the token grid of their pretraining
input: learned absolute position embeddings (CaiT, VOLO, Visformer), BEiT's
relative position tables, ConViT's relative indices, ViT-RelPos's bias MLP
windows, CoAtNet's, LeViT's, EfficientFormer's and GCViT's attention
biases, Hiera's token order, TNT's patch counts and MViTv2's relative
tables. :func:`position_grids` finds it (:class:`PositionGrid`), and for an
input of another size:

* parameters and attributes of the model are swapped for values made for
  the input's grid during one forward (:func:`resampled_positions` inside
  :func:`replaced`), computed from the parameters so gradients reach them;
* attentions whose state is read inside their own forward
  (:data:`GRID_MODULES`, MViTv2's) get it from forward hooks
  (:func:`install_grid_hooks`), so that activation checkpointing, which runs
  a block again in the backward, gets it again.

:func:`input_positions` does both for one forward of the extractor.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from timm.layers import (PatchEmbed, ndgrid, resample_abs_pos_embed,
                         resample_abs_pos_embed_nhwc,
                         resize_rel_pos_bias_table_simple, to_2tuple)
from timm.layers.pos_embed_rel import (RelPosBias, RelPosBiasTf, RelPosMlp,
                                       gen_relative_log_coords,
                                       generate_lookup_tensor)
from timm.layers.pos_embed_rel import \
    gen_relative_position_index as rel_pos_index
from timm.models.beit import Attention as BeitAttention
from timm.models.convit import GPSA
from timm.models.efficientformer import Attention as EfficientFormerAttn
from timm.models.efficientformer_v2 import Attention2d as EfficientV2Attn
from timm.models.efficientformer_v2 import \
    Attention2dDownsample as EfficientV2AttnDownsample
from timm.models.gcvit import GlobalContextVitBlock
from timm.models.hiera import Hiera, Reroll
from timm.models.levit import Attention as LevitAttention
from timm.models.levit import AttentionDownsample as LevitAttnDownsample
from timm.models.levit import Downsample as LevitDownsample
from timm.models.mvitv2 import (MultiScaleAttention,
                                MultiScaleAttentionPoolFirst)
from timm.models.tnt import PixelEmbed
from torch import nn

#: timm's MViTv2 attentions, whose relative position tables are resized
#: to each input (see _enter_mvit).
MVIT_ATTENTIONS = (MultiScaleAttention, MultiScaleAttentionPoolFirst)


@dataclass(frozen=True)
class PositionGrid:
    """Position state made for the token grid of one stride: ``name``
    (relative to the extractor) of a learned absolute position embedding
    or of a module that holds such state, its ``layout``
    (``'NLC'`` with ``prefix`` class/distillation tokens first, ``'NCHW'``
    or ``'NHWC'``; ``'REL'``: ``name`` is a BEiT attention whose relative
    position table spans its window; ``'GPSA'``: a ConViT attention;
    ``'MLP'``: a ViT-RelPos attention, whose bias MLP reads its window;
    ``'TNT'``: TNT's pixel embedding, which checks the size and counts
    patches) and the ``grid`` it has at the
    pretraining size."""
    name: str
    layout: str
    stride: int
    grid: Tuple[int, int]
    prefix: int = 0


def position_grids(model: nn.Module, native: Tuple[int, int],
                   strides: Sequence[int]) -> Tuple[PositionGrid, ...]:
    """The model's position state made for the token grid of its
    pretraining size ``native``, at one of its feature ``strides``:
    absolute position embeddings (parameters named ``*pos*`` whose shape
    holds the grid), and modules that hold a grid-sized window or count
    (BEiT's and ViT-RelPos's attentions, ConViT's, TNT's pixel embedding).

    Example:
        >>> import timm
        >>> model = timm.create_model('cait_xxs24_224', features_only=True)
        >>> position_grids(model, (224, 224), (16, ))
        (PositionGrid(name='model.pos_embed', layout='NLC', stride=16, \
grid=(14, 14), prefix=0),)
    """
    grids = {stride: (native[0] // stride, native[1] // stride)
             for stride in sorted(set(strides))}
    found = []
    for name, param in model.named_parameters():
        if 'pos' not in name.rpartition('.')[2] or param.dim() not in (
                3, 4) or param.shape[0] != 1:
            continue
        shape = tuple(param.shape[1:])
        for stride, grid in grids.items():
            if native[0] % stride or native[1] % stride:
                continue
            tokens = grid[0] * grid[1]
            if param.dim() == 4 and shape[1:] == grid:
                found.append(PositionGrid(name, 'NCHW', stride, grid))
            elif param.dim() == 4 and shape[:2] == grid:
                found.append(PositionGrid(name, 'NHWC', stride, grid))
            elif param.dim() == 3 and 0 <= shape[0] - tokens <= 8:
                found.append(PositionGrid(name, 'NLC', stride, grid,
                                          shape[0] - tokens))
            else:
                continue
            break
    # NOTE: module state made for the token grid: Hiera's token order
    # (unrolled into mask units by a schedule made for its grid of mask
    # units, at stride patch x mask unit); GCViT's blocks (windows a fixed
    # fraction of the map, their relative position biases with them);
    # CoAtNet's relative position biases over a whole map (named by their
    # attention, which calls their get_bias with fused attention; square
    # ones only: a window of MaxViT's that equals a grid is not told apart,
    # but then the model does not run and stays refused); LeViT's and
    # EfficientFormer's attention biases by token offset; BEiT's per-block
    # relative position tables span their window, the whole grid (timm's
    # resize takes square windows only); ViT-RelPos's bias MLPs read their
    # window's coordinates (named by their attention, which calls them, or
    # their get_bias with fused attention, inside its forward; a
    # model-level shared one is called outside any forward, where no hook
    # sees it); TNT's pixel embedding checks the input size and, with the
    # model, reshapes by its patch count; ConViT's gated attention makes
    # its relative indices for a square grid of N tokens.
    # NOTE: a grid made by padded stride-2 steps is rounded up (LeViT: 4x4
    # at stride 64 of 224).
    stride_of: Dict[Tuple[int, int], int] = {}
    for stride in grids:  # the finest stride first
        grid = (-(-native[0] // stride), -(-native[1] // stride))
        stride_of.setdefault(grid, stride)
    single = len(set(strides)) == 1
    shared = any(n.endswith('shared_rel_pos') for n, m in
                 model.named_modules() if isinstance(m, RelPosMlp))
    gcvit = {f'{n}.attn' for n, m in model.named_modules()
             if isinstance(m, GlobalContextVitBlock)}
    for name, module in model.named_modules():
        if isinstance(module, (BeitAttention, RelPosMlp)):
            window = tuple(module.window_size or ())
            stride = stride_of.get(window)
            if stride is None:
                continue
            if isinstance(module, BeitAttention) and window[0] == window[1]:
                found.append(PositionGrid(name, 'REL', stride, window))
            elif isinstance(module, RelPosMlp) and not shared:
                found.append(PositionGrid(name.rpartition('.')[0], 'MLP',
                                          stride, window))
        elif isinstance(module, GlobalContextVitBlock):
            window = tuple(module.window_size)
            if window in stride_of:
                found.append(PositionGrid(name, 'GCVIT', stride_of[window],
                                          window))
        elif isinstance(module, (RelPosBias, RelPosBiasTf)) and not getattr(
                module, 'prefix_tokens', 0) and name.endswith('.rel_pos') and (
                    name.rpartition('.')[0] not in gcvit):
            window = tuple(module.window_size)
            if window in stride_of and window[0] == window[1]:
                found.append(PositionGrid(name.rpartition('.')[0], 'RPB',
                                          stride_of[window], window))
        elif isinstance(module, OFFSET_MODULES):
            window = _offset_grid(module)
            if window in stride_of:
                found.append(PositionGrid(name, 'OFFSET', stride_of[window],
                                          window))
        elif isinstance(module, Hiera) and getattr(
                module, 'pos_embed_spatial', None) is None:
            stride = module.patch_stride[0] * module.mask_unit_size[0]
            if tuple(module.mask_spatial_shape) == (native[0] // stride,
                                                    native[1] // stride):
                found.append(PositionGrid(name, 'UNROLL', stride, tuple(
                    module.mask_spatial_shape)))
        elif isinstance(module, PixelEmbed) and single:
            found.append(PositionGrid(name, 'TNT', strides[0],
                                      tuple(module.grid_size)))
        elif isinstance(module, GPSA) and single and (
                not native[0] % strides[0]):
            found.append(PositionGrid(name, 'GPSA', strides[0],
                                      grids[strides[0]]))
    return tuple(found)


def resampled_positions(model: nn.Module, grids: Sequence[PositionGrid],
                        size: Sequence[int]) -> Dict[str, object]:
    """The position state for the token grids of an input of ``size`` (a
    multiple of every grid's stride), by name: embeddings resampled
    (bicubic, antialiased: timm's own functions), :data:`GRID_MODULES`'
    state as :func:`_grid_values` makes it, TNT's size and patch counts.
    Computed from the parameters, so gradients reach them; modules and
    parameters the extractor no longer has (pruned) are skipped."""
    if not grids:
        return {}
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: Dict[str, object] = {}
    for g in grids:
        new = [size[0] // g.stride, size[1] // g.stride]
        if g.layout in GRID_MODULES:
            attn = modules.get(g.name)
            if attn is not None:
                out.update({f'{g.name}.{k}': v for k, v in _grid_values(
                    attn, g.layout, g.grid, new).items()})
            continue
        if g.layout == 'UNROLL':
            hiera = modules.get(g.name)
            if hiera is not None:
                out.update(_unroll_values(hiera, g.name, new))
            continue
        if g.layout == 'TNT':
            owner = g.name.rpartition('.')[0]
            out.update({f'{g.name}.img_size': (new[0] * g.stride,
                                               new[1] * g.stride),
                        f'{g.name}.num_patches': new[0] * new[1],
                        f'{owner}.num_patches'.lstrip('.'): new[0] * new[1]})
            continue
        param = params.get(g.name)
        if param is None:
            continue
        if g.layout == 'NLC':
            out[g.name] = resample_abs_pos_embed(
                param, new, list(g.grid), num_prefix_tokens=g.prefix)
        elif g.layout == 'NHWC':
            out[g.name] = resample_abs_pos_embed_nhwc(param, new)
        else:
            out[g.name] = resample_abs_pos_embed_nhwc(
                param.permute(0, 2, 3, 1), new).permute(0, 3, 1, 2)
    return out


def _unroll_values(hiera: nn.Module, name: str,
                   grid: Sequence[int]) -> Dict[str, object]:
    """Hiera's token order for a ``grid`` of mask units: the sizes its
    unroll and reroll use and the reroll's schedule, as timm makes them
    for that input size (its blocks read the number of mask units from
    the tokens)."""
    unit, patch = hiera.mask_unit_size, hiera.patch_stride
    tokens = [n * u for n, u in zip(grid, unit)]
    reroll = Reroll([n * p for n, p in zip(tokens, patch)], patch,
                    hiera.unroll.schedule, hiera.stage_ends, hiera.q_pool)
    prefix = f'{name}.' if name else ''
    return {f'{prefix}{k}': v for k, v in (
        ('unroll.size', tokens), ('reroll.size', reroll.size),
        ('reroll.schedule', reroll.schedule),
        ('tokens_spatial_shape', tokens),
        ('mask_spatial_shape', list(grid)))}


@lru_cache(maxsize=4)
def _rel_index(grid: Tuple[int, int],
               class_token: bool = False) -> torch.Tensor:
    """timm's relative position index for a token grid (``class_token``:
    BEiT's, with one class token), made once per grid: it is the same for
    every block, and large ((h * w + 1)^2 entries). Made outside inference
    mode, so that a training forward after an inference one can save it
    for the backward."""
    with torch.inference_mode(False):
        return rel_pos_index(grid, class_token=class_token, device='cpu')


def _window_values(attn: nn.Module, native: Tuple[int, int],
                   grid: Sequence[int]) -> Dict[str, object]:
    """A BEiT attention's relative position table, index and window for a
    token ``grid``: the table resized by
    timm's bicubic resize, not the geometric one timm's ``set_input_size``
    uses (a per-head Python loop: for BEiT-B's 12 tables at 800x1216,
    about 1 s per forward here against 0.03 s)."""
    grid = tuple(grid)
    table = attn.relative_position_bias_table
    return {
        'relative_position_bias_table': resize_rel_pos_bias_table_simple(
            table, new_window_size=grid,
            new_bias_shape=((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3,
                            table.shape[1])),
        'relative_position_index': _rel_index(grid, True).to(table.device),
        'window_size': grid,
    }


def _gpsa_values(attn: nn.Module, native: Tuple[int, int],
                 grid: Sequence[int]) -> Dict[str, object]:
    """A ConViT attention's relative indices (x offset, y offset, squared
    distance between every two tokens) for a token ``grid`` of any shape;
    timm makes them for a square one."""
    grid = tuple(grid)
    weight = attn.qk.weight
    index = torch.arange(grid[0] * grid[1], device=weight.device)
    row, col = index // grid[1], index % grid[1]
    dx = (col[None, :] - col[:, None]).to(weight.dtype)
    dy = (row[None, :] - row[:, None]).to(weight.dtype)
    return {'rel_indices': torch.stack([dx, dy, dx ** 2 + dy ** 2], -1)[None]}


def _mlp_values(attn: nn.Module, native: Tuple[int, int],
                grid: Sequence[int]) -> Dict[str, object]:
    """A ViT-RelPos attention's bias MLP (``rel_pos``): its window, index
    and log coordinates for a token ``grid``, as its ``set_window_size``
    makes them (the MLP's weights do not depend on the window)."""
    grid = tuple(grid)
    rel_pos = attn.rel_pos
    coords = rel_pos.rel_coords_log
    area = grid[0] * grid[1]
    values = {
        'window_size': grid, 'window_area': area,
        'bias_shape': (area, area, rel_pos.num_heads),
        'rel_coords_log': gen_relative_log_coords(
            grid, rel_pos.pretrained_window_size, mode=rel_pos.mode,
            device=coords.device, dtype=coords.dtype),
    }
    if rel_pos.relative_position_index is not None:
        values['relative_position_index'] = _rel_index(grid).view(-1).to(
            coords.device)
    return {f'rel_pos.{k}': v for k, v in values.items()}


#: Modules whose attention biases are a table over token offsets (LeViT's,
#: EfficientFormer's and EfficientFormerV2's), or that reshape tokens to
#: their grid (LeViT's subsampling).
OFFSET_MODULES = (EfficientFormerAttn, EfficientV2Attn,
                  EfficientV2AttnDownsample, LevitAttention,
                  LevitAttnDownsample, LevitDownsample)


def _offset_grid(module: nn.Module) -> Tuple[int, int]:
    """The token grid an :data:`OFFSET_MODULES` module was made for
    (EfficientFormer keeps no resolution: its square table tells it)."""
    if hasattr(module, 'resolution'):
        return tuple(to_2tuple(module.resolution))
    side = math.isqrt(module.attention_biases.shape[1])
    return (side, side) if side * side == module.attention_biases.shape[
        1] else (0, 0)


@lru_cache(maxsize=8)
def _offset_index(grid: Tuple[int, int], stride: int) -> torch.Tensor:
    """LeViT's (and EfficientFormer's) bias index for a grid: the bias of a
    query and a key token is the table's entry at their absolute offset
    ``(|dy|, |dx|)``; queries are every ``stride``-th token (LeViT's
    subsampling attention), as timm makes them. Made outside inference
    mode, as :func:`_rel_index`."""
    with torch.inference_mode(False):
        keys = torch.stack(ndgrid(torch.arange(grid[0]),
                                  torch.arange(grid[1]))).flatten(1)
        queries = torch.stack(ndgrid(
            torch.arange(0, grid[0], stride),
            torch.arange(0, grid[1], stride))).flatten(1)
        rel = (queries[..., :, None] - keys[..., None, :]).abs()
        return rel[0] * grid[1] + rel[1]


def _rpb_values(attn: nn.Module, native: Tuple[int, int],
                grid: Sequence[int]) -> Dict[str, object]:
    """A relative position bias over a whole map (CoAtNet's ``RelPosBias``
    or ``RelPosBiasTf``) for a token ``grid``: the table resized as BEiT's
    (timm's bicubic resize), its index or lookups, window and shapes, as
    its ``set_window_size`` makes them (without replacing the
    parameter). ``attn`` is the attention that holds it as ``rel_pos``."""
    bias = attn.rel_pos
    grid = tuple(grid)
    table = bias.relative_position_bias_table
    vocab = (2 * grid[0] - 1, 2 * grid[1] - 1)
    area = grid[0] * grid[1]
    values: Dict[str, object] = {'window_size': grid, 'window_area': area}
    if isinstance(bias, RelPosBiasTf):
        shape = (bias.num_heads, *vocab)
        lookup = bias.height_lookup
        values.update(
            bias_shape=shape,
            height_lookup=generate_lookup_tensor(
                grid[0], device=lookup.device, dtype=lookup.dtype),
            width_lookup=generate_lookup_tensor(
                grid[1], device=lookup.device, dtype=lookup.dtype))
    else:
        heads = table.shape[-1]
        shape = (vocab[0] * vocab[1], heads)
        values.update(bias_shape=(area, area, heads),
                      relative_position_index=_rel_index(grid).view(-1).to(
                          table.device))
    values['relative_position_bias_table'] = (
        resize_rel_pos_bias_table_simple(table, new_window_size=grid,
                                         new_bias_shape=shape))
    return {f'rel_pos.{k}': v for k, v in values.items()}


def _offset_values(attn: nn.Module, native: Tuple[int, int],
                   grid: Sequence[int]) -> Dict[str, object]:
    """An :data:`OFFSET_MODULES` module's state for a token ``grid``: its
    resolution; its bias table over offsets ``0..r-1`` on each axis
    resized (bicubic, as the relative tables above) to ``0..h-1`` and
    ``0..w-1``, with the index for the grid; its per-device cache of
    biases emptied, so the native ones are not reused."""
    grid = tuple(grid)
    values: Dict[str, object] = {}
    if hasattr(attn, 'resolution'):
        values['resolution'] = grid
    if hasattr(attn, 'N'):
        values['N'] = grid[0] * grid[1]
    # NOTE: queries every other token (EfficientFormerV2's downsampling
    # attention keeps their grid as resolution2).
    step = 2 if isinstance(attn, EfficientV2AttnDownsample) else getattr(
        attn, 'stride', 1)
    if hasattr(attn, 'resolution2'):
        half = (-(-grid[0] // 2), -(-grid[1] // 2))
        values.update(resolution2=half, N2=half[0] * half[1])
    table = getattr(attn, 'attention_biases', None)
    if table is None:
        return values
    heads = table.shape[0]
    values.update(
        attention_biases=torch.nn.functional.interpolate(
            table.reshape(1, heads, *native), size=grid, mode='bicubic',
            align_corners=False).reshape(heads, grid[0] * grid[1]),
        attention_bias_idxs=_offset_index(grid, step).to(table.device),
        attention_bias_cache={})
    return values


def _gcvit_values(block: nn.Module, native: Tuple[int, int],
                  grid: Sequence[int]) -> Dict[str, object]:
    """A GCViT block's windows for an input whose grid at the window's
    stride is ``grid``: windows that grow with the input, as timm makes
    them for that size (``window_ratio``), so that the stage's global query
    (its map after a fixed number of halvings) still has a window's size;
    the window attention's relative position bias made for them."""
    grid = tuple(grid)
    return {'window_size': grid, 'attn.window_size': grid,
            **{f'attn.{k}': v for k, v in _rpb_values(
                block.attn, native, grid).items()}}


#: Attentions whose position state is made for a token grid, by the layout
#: of their PositionGrid: the values for a grid (see _grid_values).
GRID_MODULES: Dict[str, Callable[..., Dict[str, object]]] = {
    'REL': _window_values,
    'GPSA': _gpsa_values,
    'MLP': _mlp_values,
    'RPB': _rpb_values,
    'OFFSET': _offset_values,
    'GCVIT': _gcvit_values,
}


def _grid_values(attn: nn.Module, layout: str, native: Tuple[int, int],
                 grid: Sequence[int]) -> Dict[str, object]:
    """The position state of a :data:`GRID_MODULES` attention for a token
    ``grid``; nothing at its ``native`` grid (its own state), except when
    traced for ONNX, where the grid is a traced shape."""
    if not torch.jit.is_tracing() and tuple(grid) == tuple(native):
        return {}
    return GRID_MODULES[layout](attn, native, grid)


def _swap(model: nn.Module, values: Dict[str, object], saved: list) -> None:
    """Set ``model``'s parameters, buffers or attributes named in
    ``values`` to those values; ``saved`` gets what :func:`_restore` puts
    back."""
    for name, value in values.items():
        owner, _, attr = name.rpartition('.')
        module = model.get_submodule(owner)
        for kind in ('_parameters', '_buffers'):
            table = getattr(module, kind)
            if attr in table:
                saved.append((module, attr, kind, table.pop(attr)))
                break
        else:
            saved.append((module, attr, None, getattr(module, attr)))
        setattr(module, attr, value)


def _restore(saved: list) -> None:
    for module, attr, kind, old in reversed(saved):
        if kind is None:
            setattr(module, attr, old)
        else:
            delattr(module, attr)
            getattr(module, kind)[attr] = old


@contextmanager
def replaced(model: nn.Module,
             values: Dict[str, object]) -> Iterator[None]:
    """Within the block, ``model``'s parameters, buffers or attributes named
    in ``values`` are those values (tensors computed from the parameters,
    so gradients flow back to them); restored on exit. torch's
    ``functional_call`` does this for tensors, but not under the ONNX
    tracer ("The stateless API can't be used with Jitted modules")."""
    saved: list = []
    try:
        _swap(model, values, saved)
        yield
    finally:
        _restore(saved)


def _swap_in(attn: nn.Module, values: Dict[str, object]) -> None:
    """Swap ``values`` into ``attn`` until :func:`_exit_window` (kept on
    the module, since a pre-hook and a forward hook share nothing else)."""
    attn.vb_saved = []
    _swap(attn, values, attn.vb_saved)


def _enter_window(attn: nn.Module, args) -> None:
    """Forward pre-hook of an attention of :data:`GRID_MODULES` (BEiT's,
    ConViT's, ViT-RelPos's): its position state for the grid the backbone set
    (``vb_grid``). A hook, not a swap around the whole model, so that
    gradient checkpointing, which runs the block again during the
    backward, gets it again."""
    _swap_in(attn, _grid_values(attn, attn.vb_layout, attn.vb_native,
                                attn.vb_grid))


def _exit_window(attn: nn.Module, args, output) -> None:
    """Forward hook: puts back what a pre-hook swapped in."""
    _restore(attn.__dict__.pop('vb_saved', []))


def _pooled(pool: Optional[nn.Module], n: int, axis: int) -> int:
    if pool is None:
        return n
    kernel, stride, pad = (to_2tuple(getattr(pool, a))[axis]
                           for a in ('kernel_size', 'stride', 'padding'))
    return (n + 2 * pad - kernel) // stride + 1


def _enter_mvit(attn: nn.Module, args) -> None:
    """Forward pre-hook of an MViTv2 attention: its relative position
    tables (one per axis, sized ``2 * max(q, k) - 1`` for the pretraining
    grid) linearly resized to the grid it is called with, as detectron2's
    MViTv2 resizes them (timm indexes past their end on a larger grid)."""
    values = {}
    for name, axis in (('rel_pos_h', 0), ('rel_pos_w', 1)):
        n = args[1][axis]
        length = 2 * max(_pooled(attn.pool_q, n, axis),
                         _pooled(attn.pool_k, n, axis)) - 1
        table = getattr(attn, name)
        if torch.jit.is_tracing() or length != table.shape[0]:
            values[name] = torch.nn.functional.interpolate(
                table.T.unsqueeze(0), size=length, mode='linear',
                align_corners=False)[0].T
    _swap_in(attn, values)


def relax_patch_embeds(model: nn.Module) -> None:
    """timm's patch embeddings stop checking the input against their
    pretraining size (the position embeddings are resampled instead)."""
    for module in model.modules():
        if isinstance(module, PatchEmbed):
            module.strict_img_size = False


def install_grid_hooks(body: nn.Module,
                       grids: Sequence[PositionGrid]) -> Tuple[str, ...]:
    """Hook the attentions of ``body`` whose position state is read inside
    their forward: those of :data:`GRID_MODULES` among ``grids`` (their
    state for the grid :func:`input_positions` sets) and MViTv2's with
    spatial relative positions (their tables for the grid they are called
    with). Returns the names of the hooked modules."""
    modules = dict(body.named_modules())
    hooked = [g for g in grids
              if g.layout in GRID_MODULES and g.name in modules]
    for g in hooked:
        attn = modules[g.name]
        attn.vb_layout = g.layout
        attn.vb_native = attn.vb_grid = g.grid
        attn.register_forward_pre_hook(_enter_window)
        attn.register_forward_hook(_exit_window)
    mvit = tuple(n for n, m in modules.items()
                 if isinstance(m, MVIT_ATTENTIONS)
                 and m.rel_pos_type == 'spatial')
    for name in mvit:
        modules[name].register_forward_pre_hook(_enter_mvit)
        modules[name].register_forward_hook(_exit_window)
    return tuple(g.name for g in hooked) + mvit


@contextmanager
def input_positions(body: nn.Module, grids: Sequence[PositionGrid],
                    hooked: Sequence[str],
                    size: Sequence[int]) -> Iterator[None]:
    """Within the block, ``body``'s position state is made for an input of
    ``size`` (padded to every grid's stride): the hooked attentions
    (:func:`install_grid_hooks`) get their grid, the rest is swapped in
    (:func:`replaced`). On an error, hooks that swapped state in but never
    ran their exit (a block failed mid-way) put it back."""
    for g in grids:
        if g.layout in GRID_MODULES and g.name in hooked:
            body.get_submodule(g.name).vb_grid = (size[0] // g.stride,
                                                  size[1] // g.stride)
    try:
        with replaced(body, resampled_positions(
                body, [g for g in grids if g.layout not in GRID_MODULES],
                size)):
            yield
    except BaseException:
        for name in hooked:
            _exit_window(body.get_submodule(name), None, None)
        raise
