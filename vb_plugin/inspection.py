"""What a config builds, read off the real model and optimizer.

"Is my checkpoint loaded, is my stage frozen, does layer decay apply?"
:func:`inspect_config` builds the config's model (without its pretrained
file) and its optimizer wrapper with mmengine's builder, puts the model in
training mode as the Runner does, and reads every figure from them:

* each backbone stage's output channels and stride, parameter count, whether
  it is frozen (``requires_grad``) and how many of its batch norms stay in
  eval mode;
* the learning rate and weight decay each parameter gets from the config's
  optimizer constructor (layer-wise decay included), summarised per stage;
* the neck's input channels against the backbone's outputs;
* with a checkpoint, the strict loader's report (or its refusal).

``tools/inspect_config.py`` prints :func:`format_summary` of it.
"""
import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from torch import nn

from .layers import is_batch_norm


@dataclass
class ParamInfo:
    """One parameter: its name in the model, size, and what the optimizer
    gives it (``lr``/``weight_decay`` None when it is not optimized)."""
    name: str
    numel: int
    requires_grad: bool
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class StageInfo:
    """The stem (``index`` -1) or a backbone stage."""
    index: int
    modules: Tuple[str, ...]
    channels: Optional[int]
    stride: Optional[int]
    is_output: bool
    params: List[ParamInfo] = field(default_factory=list)
    batch_norms: int = 0
    batch_norms_in_eval: int = 0

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def frozen(self) -> bool:
        return bool(self.params) and not any(p.requires_grad
                                             for p in self.params)


@dataclass
class ConfigSummary:
    """What :func:`inspect_config` found."""
    backbone_type: str
    out_indices: Tuple[int, ...]
    out_channels: Tuple[int, ...]
    out_strides: Tuple[int, ...]
    stages: List[StageInfo]
    neck_type: Optional[str]
    neck_in_channels: Optional[List[int]]
    optimizer: str
    other_params: Dict[str, List[ParamInfo]]
    load_report: Optional[str] = None
    load_error: Optional[str] = None


def _neck_in_channels(neck: nn.Module) -> Optional[List[int]]:
    convs = getattr(neck, 'lateral_convs', None) or getattr(
        neck, 'convs', None)
    if not convs:
        return None
    return [int(getattr(c, 'conv', c).in_channels) for c in convs]


def _optimizer_settings(model: nn.Module, optim_cfg
                        ) -> Tuple[str, Dict[int, Tuple[float, float]]]:
    optim_cfg = copy.deepcopy(optim_cfg)
    # NOTE: the param groups come from the constructor, not the wrapper
    # type; AmpOptimWrapper cannot be built without a GPU.
    if optim_cfg.get('type') == 'AmpOptimWrapper':
        optim_cfg['type'] = 'OptimWrapper'
        optim_cfg.pop('loss_scale', None)
    wrapper = build_optim_wrapper(model, optim_cfg)
    opt = wrapper.optimizer
    settings = {}
    for group in opt.param_groups:
        for p in group['params']:
            settings[id(p)] = (group['lr'], group.get('weight_decay', 0.0))
    return type(opt).__name__, settings


def inspect_config(cfg: Config,
                   checkpoint: Optional[str] = None) -> ConfigSummary:
    """Build ``cfg``'s model and optimizer and read what they hold.

    Args:
        cfg (Config): A loaded mmdet/mmseg config with a VB backbone.
        checkpoint (str, optional): A checkpoint to load into the backbone
            with :func:`vb_plugin.load_pretrained` (strict), for its report.

    Returns:
        ConfigSummary: The figures, all from the built model and optimizer.

    Example:
        >>> from vb_plugin.apis import load_config
        >>> s = inspect_config(load_config(
        ...     'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py'))
        >>> s.out_channels, s.out_strides, s.neck_in_channels
        ((32, 64, 128, 256), (4, 8, 16, 32), [32, 64, 128, 256])
    """
    from .apis import build_detector
    from .weights import load_pretrained
    model = build_detector(cfg, pretrained=False)
    model.train()
    backbone = model.backbone
    optimizer, settings = ('none', {})
    if cfg.get('optim_wrapper') is not None:
        optimizer, settings = _optimizer_settings(model, cfg.optim_wrapper)

    def info(name: str, p: nn.Parameter) -> ParamInfo:
        lr, wd = settings.get(id(p), (None, None))
        return ParamInfo(name, p.numel(), p.requires_grad, lr, wd)

    groups = [(-1, tuple(backbone.stem_module_names()))] + [
        (i, tuple(backbone.stage_module_names(i)))
        for i in range(backbone.num_built_stages)
    ]
    owner: Dict[str, int] = {}
    stages = []
    for index, names in groups:
        stage = StageInfo(
            index, names,
            backbone.stage_channels[index] if index >= 0 else None,
            backbone.stage_strides[index] if index >= 0 else None,
            index in backbone.out_indices)
        for mod_name in names:
            module = backbone.get_submodule(mod_name)
            for pname, p in module.named_parameters():
                full = f'{mod_name}.{pname}'
                owner[full] = index
                stage.params.append(info(f'backbone.{full}', p))
            for m in module.modules():
                if is_batch_norm(m):
                    stage.batch_norms += 1
                    stage.batch_norms_in_eval += not m.training
        stages.append(stage)
    for pname in backbone.stem_parameter_names():
        owner[pname] = -1
        stages[0].params.append(
            info(f'backbone.{pname}', backbone.get_parameter(pname)))

    other: Dict[str, List[ParamInfo]] = {}
    for name, p in model.named_parameters():
        if name.startswith('backbone.') and name[len('backbone.'):] in owner:
            continue
        part = name.split('.')[0]
        if name.startswith('backbone.'):
            part = 'backbone (output norms, other)'
        other.setdefault(part, []).append(info(name, p))

    neck = getattr(model, 'neck', None)
    summary = ConfigSummary(
        backbone_type=type(backbone).__name__,
        out_indices=tuple(backbone.out_indices),
        out_channels=tuple(backbone.out_channels),
        out_strides=tuple(backbone.out_strides),
        stages=stages,
        neck_type=type(neck).__name__ if neck is not None else None,
        neck_in_channels=_neck_in_channels(neck) if neck is not None
        else None,
        optimizer=optimizer,
        other_params=other)
    if checkpoint is not None:
        from .weights import CheckpointError
        try:
            summary.load_report = str(
                load_pretrained(backbone, checkpoint, verbose=False))
        except CheckpointError as err:
            summary.load_error = str(err)
    return summary


def _lr_text(params: List[ParamInfo]) -> str:
    trained = [p for p in params if p.requires_grad]
    if params and not trained:
        return 'frozen (not updated)'
    pairs = sorted({(p.lr, p.weight_decay) for p in trained
                    if p.lr is not None})
    if not pairs:
        return 'not optimized'
    lrs = sorted({lr for lr, _ in pairs})
    wds = sorted({wd for _, wd in pairs})
    lr = (f'lr {lrs[0]:.3g}' if len(lrs) == 1 else
          f'lr {lrs[0]:.3g}..{lrs[-1]:.3g}')
    wd = (f'wd {wds[0]:.3g}' if len(wds) == 1 else
          f'wd {wds[0]:.3g}..{wds[-1]:.3g}')
    return f'{lr}, {wd}'


def format_summary(summary: ConfigSummary) -> str:
    """A printable table of :class:`ConfigSummary`.

    Example:
        >>> from vb_plugin.apis import load_config
        >>> text = format_summary(inspect_config(load_config(
        ...     'configs/mask_rcnn/mask-rcnn_vb-r18_fpn_toy.py')))
        >>> print(text.splitlines()[0])
        backbone VBResNet: out_indices (0, 1, 2, 3), out_channels (32, 64, 128, 256), out_strides (4, 8, 16, 32)
    """
    s = summary
    lines = [f'backbone {s.backbone_type}: out_indices {s.out_indices}, '
             f'out_channels {s.out_channels}, out_strides {s.out_strides}',
             f'{"stage":<7}{"channels":>9}{"stride":>7}{"params":>11}  '
             f'{"frozen":<7}{"BN in eval":<11}optimizer ({s.optimizer})']
    for st in s.stages:
        name = 'stem' if st.index < 0 else str(st.index) + (
            '*' if st.is_output else '')
        bn = (f'{st.batch_norms_in_eval}/{st.batch_norms}'
              if st.batch_norms else '-')
        lines.append(
            f'{name:<7}{st.channels if st.channels else "-":>9}'
            f'{st.stride if st.stride else "-":>7}{st.num_params:>11,}  '
            f'{"yes" if st.frozen else "no":<7}{bn:<11}{_lr_text(st.params)}')
    lines.append('(* = an output)')
    for part, params in s.other_params.items():
        lines.append(f'{part}: {sum(p.numel for p in params):,} parameters, '
                     f'{_lr_text(params)}')
    if s.neck_type is not None:
        ok = (s.neck_in_channels is None
              or list(s.neck_in_channels) == list(s.out_channels))
        lines.append(f'neck {s.neck_type}: in_channels {s.neck_in_channels} '
                     f'<- backbone out_channels {list(s.out_channels)} '
                     f'({"match" if ok else "MISMATCH"})')
    if s.load_report is not None:
        lines.append('checkpoint: ' + s.load_report)
    if s.load_error is not None:
        lines.append('checkpoint REFUSED: ' + s.load_error)
    return '\n'.join(lines)
