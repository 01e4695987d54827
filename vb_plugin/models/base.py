"""The backbone contract shared by every vb_plugin family.

A family subclasses :class:`VBBackbone` and writes only its architecture:
builders that return the stem's and stage ``i``'s modules by name, and the
names of any stage's modules.
Everything that cuts across families is here, written once:

* ``out_indices``: 0..3 are the stride-4, 8, 16 and 32 stages (C2..C5);
  negative values count from the end; outputs come in stage order.
* ``frozen_stages``: mmdet's meaning everywhere. -1 freezes nothing, 0 the
  stem, ``k`` the stem and the first ``k`` stages.
* ``norm_eval`` and ``frozen_bn``.
* ``out_norm_cfg``: an optional norm on each output.
* ``out_channels`` / ``out_strides`` metadata, one entry per output.
* ``with_cp``: activation checkpointing per block.
* Stages after the last requested output are not built.
* ``init_cfg=dict(type='Pretrained', checkpoint=...)`` goes through the strict,
  converting loader in :mod:`vb_plugin.weights`.
* ``in_channels`` checked (a family sets it), and every input checked against
  it (:meth:`VBBackbone.check_input`).
* Hooks with defaults that the fast path, the export and the optimizer
  constructor call on every backbone: :meth:`VBBackbone.set_fast_layers`,
  :meth:`VBBackbone.prepare_export`, :attr:`VBBackbone.lr_decay_num_layers`
  and :meth:`VBBackbone.lr_decay_layer_id`.
"""
import copy
import inspect
from abc import ABCMeta, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmdet.utils import OptConfigType
from torch import nn

from ..checks import (check_frozen_stages, check_int, resolve_out_indices,
                      round_up_to)
from ..layers import check_norm_cfg, freeze_batch_norms, is_batch_norm
from ..weights.module import LoadableModule

__all__ = ['FAMILY_SET', 'OptConfigType', 'VBBackbone', 'check_frozen_stages',
           'resolve_out_indices', 'round_up_to']

#: :class:`VBBackbone` parameters that a family computes and passes on
#: itself; the others are the contract options, which every family takes.
FAMILY_SET = ('stage_channels', 'stage_strides')


class VBBackbone(LoadableModule, metaclass=ABCMeta):
    """Base class of every vb_plugin backbone.

    A family passes its per-stage channels and strides, then implements
    :meth:`build_stem` and :meth:`build_stage`, which return their modules
    by name, and :meth:`stage_module_names`, which names the modules of any
    stage, built or not. This class registers what is built (stages past
    the last output are not), runs the forward pass and applies every
    cross-family option.

    The contract options below are declared here only. A family's
    ``__init__`` lists its architecture options and ends in ``**kwargs``,
    which it passes on; its signature (``inspect.signature``, ``help()``)
    then shows the contract options too, keyword-only, with these defaults.
    A family that changes a default lists that option itself (VBConvNeXt's
    ``out_norm_cfg``), and its default initialisation is the class
    attribute :attr:`default_init_cfg`.

    Args:
        stage_channels (Sequence[int]): Output channels of every stage of the
            architecture (built or not).
        stage_strides (Sequence[int]): Output stride (relative to the input)
            of every stage.
        out_indices (Sequence[int]): Stages whose outputs are returned. 0..3
            are the stride-4, 8, 16 and 32 stages (C2..C5) in every family.
            Negative values count from the end. Outputs come in stage
            order, whatever the order given. An empty sequence, an index
            out of range or a stage named twice raises ``ValueError``; a
            non-sequence or a non-int raises ``TypeError``. Stages after
            the last requested one are not built. Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the stem, ``k`` the stem
            and the first ``k`` stages (mmdet's meaning). Frozen parameters
            get ``requires_grad=False`` and frozen modules stay in eval mode
            after any ``.train()``. Valid values: -1 to the number of stages
            of the architecture; others raise ``ValueError`` (``TypeError``
            for a non-int). Defaults to -1.
        norm_eval (bool): Keep every batch norm in eval mode while training:
            torch BN and SyncBN and their subclasses (timm's
            ``BatchNormAct2d``), and mmcv's ``SyncBatchNorm``. Only the norm
            itself: the act and drop children of a timm norm-act layer
            follow ``.train()``. Defaults to False.
        frozen_bn (bool): Replace the batch norms of the frozen stem and
            stages by :class:`vb_plugin.layers.FrozenBatchNorm2d` (same
            state-dict keys, including ``num_batches_tracked``; the same
            output as the eval-mode BN); a timm ``BatchNormAct2d`` becomes
            ``FrozenBatchNormAct2d``, which keeps its activation. Acts only
            on what ``frozen_stages`` freezes: with ``frozen_stages=-1`` it
            changes nothing. A BN without affine parameters or running
            statistics raises ``ValueError``. Defaults to False.
        out_norm_cfg (dict, optional): mmcv norm config applied to each
            output, e.g. ``dict(type='LN2d')``, ``dict(type='BN')``,
            ``dict(type='GN', num_groups=32)``. Checked at construction
            (:func:`vb_plugin.layers.check_norm_cfg`, as every family's
            ``norm_cfg``): ``'LN'`` raises ``ValueError`` (it normalises the
            last dimension of an NCHW map, the width: use ``'LN2d'``), so do
            an unregistered type (the message lists the registered norm
            types) and ``'GN'`` without ``num_groups``; a non-dict raises
            ``TypeError``. A pretrained checkpoint need not have these
            layers: they keep their initial values. Defaults to None.
        with_cp (bool): Activation checkpointing per block while training:
            same outputs and gradients, less memory. A batch norm inside a
            checkpointed block updates its running statistics twice per
            step (see docs/contract.md). Defaults to False.
        init_cfg (dict | list[dict], optional): ``None`` gives the family's
            default initialisation (:attr:`default_init_cfg`; see the
            family's ``init_cfg``). ``dict(type='Pretrained',
            checkpoint=PATH)``, with optional ``prefix`` and ``source``,
            loads strictly when ``init_weights()`` runs, through
            :func:`vb_plugin.load_pretrained` (:class:`VBTimmBackbone`:
            through timm's loading code, see its ``init_cfg``); any other
            key raises ``ValueError``. Defaults to None.
    """

    #: What the input's height and width must be multiples of (1: any size).
    #: The wiring (:mod:`vb_plugin.wiring`) checks it against the data
    #: preprocessor's ``pad_size_divisor`` when a detector is built.
    size_divisor: int = 1

    #: The family's initialisation (mmengine init configs) when
    #: ``init_cfg`` is None; None keeps each layer's own initialisation.
    default_init_cfg: Optional[Tuple[dict, ...]] = None

    #: Output norms and BN counters: layers the source models lack
    #: (:attr:`LoadableModule.new_layer_patterns`).
    new_layer_patterns: Tuple[str, ...] = (r'^out_norms\.',
                                           r'\.num_batches_tracked$')

    @property
    def in_channels(self) -> int:
        """Input channels (3 unless the family sets it). A family sets it
        (usually from its own ``in_channels`` option) before the base builds
        it; it is checked here, once for every family: ``TypeError`` for a
        non-int, ``ValueError`` below 1."""
        return self.__dict__.get('_in_channels', 3)

    @in_channels.setter
    def in_channels(self, value: int) -> None:
        self.__dict__['_in_channels'] = check_int('in_channels', value,
                                                  minimum=1)

    def __init__(self,
                 stage_channels: Sequence[int],
                 stage_strides: Sequence[int],
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 frozen_bn: bool = False,
                 out_norm_cfg: OptConfigType = None,
                 with_cp: bool = False,
                 init_cfg=None,
                 **unknown) -> None:
        if unknown:
            # NOTE: as Python words it, but naming the family the user built
            # (its options reach here through **kwargs).
            raise TypeError(f'{type(self).__name__}.__init__() got an '
                            'unexpected keyword argument '
                            f'{next(iter(unknown))!r}')
        if init_cfg is None and self.default_init_cfg is not None:
            init_cfg = copy.deepcopy(list(self.default_init_cfg))
        super().__init__(init_cfg=init_cfg)
        if len(stage_channels) != len(stage_strides):
            raise ValueError('stage_channels and stage_strides must have one '
                             f'entry per stage, got {len(stage_channels)} '
                             f'and {len(stage_strides)}')
        if out_norm_cfg is not None:
            check_norm_cfg(out_norm_cfg, 'out_norm_cfg')
        self.num_stages = len(stage_channels)
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.stage_strides = tuple(int(s) for s in stage_strides)
        self.out_indices = resolve_out_indices(out_indices, self.num_stages)
        self.frozen_stages = check_frozen_stages(frozen_stages,
                                                 self.num_stages)
        self.norm_eval = bool(norm_eval)
        self.frozen_bn = bool(frozen_bn)
        self.with_cp = bool(with_cp)
        self.out_norm_cfg = copy.deepcopy(out_norm_cfg)
        # NOTE: stages past the last output are never built, so DDP finds no
        # unused parameters and no compute is wasted.
        self.num_built_stages = self.stages_to_build()

        self._built_stem = self._add_modules(self.build_stem())
        stage_names = []
        for i in range(self.num_built_stages):
            built = self._add_modules(self.build_stage(i))
            names = tuple(self.stage_module_names(i))
            if built and built != names:
                raise TypeError(
                    f'{type(self).__name__}.build_stage({i}) returned '
                    f'{built}, but stage_module_names({i}) gives {names}: '
                    'the two must name the same modules in the same order')
            stage_names.append(names)
        self._stem_names = tuple(self.stem_module_names())
        self._stage_names = tuple(stage_names)
        if out_norm_cfg is not None:
            self.out_norms = nn.ModuleDict({
                str(i): build_norm_layer(out_norm_cfg,
                                         self.stage_channels[i])[1]
                for i in self.out_indices
            })
        self._freeze()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _publish_contract_options(cls)

    def stages_to_build(self) -> int:
        """How many stages to build: up to the last output. A family whose
        outputs come from a later stage (e.g. a pyramid built on the last
        one) builds more."""
        return max(self.out_indices) + 1

    def _add_modules(self, modules: Dict[str, nn.Module]) -> Tuple[str, ...]:
        """Register a builder's modules under their names and return the
        names. ``'name'`` becomes an attribute; ``'name.k'`` the item ``k``
        of the list ``name`` (created on first use), which must come next.
        """
        for name, module in modules.items():
            parent, _, leaf = name.rpartition('.')
            if not parent:
                self.add_module(name, module)
                continue
            container = self._modules.get(parent)
            if container is None and '.' not in parent:
                container = nn.ModuleList()
                self.add_module(parent, container)
            if not isinstance(container, nn.ModuleList) or \
                    leaf != str(len(container)):
                raise TypeError(
                    f'{type(self).__name__}: a builder returned {name!r}; '
                    'names are a plain attribute or the next item of a '
                    'list (e.g. stages.0, stages.1, ...)')
            container.append(module)
        return tuple(modules)

    # ------------------------------------------------------------------
    # What a family implements.
    @abstractmethod
    def build_stem(self) -> Dict[str, nn.Module]:
        """The stem's modules, in forward order, by name (see
        :meth:`_add_modules` for the names); the base registers them."""

    @abstractmethod
    def build_stage(self, i: int) -> Dict[str, nn.Module]:
        """Stage ``i``'s modules, in forward order, by the names
        :meth:`stage_module_names` gives; the base registers them (and
        checks the names). A family that builds its whole network in the
        stem (timm's extractors) returns ``{}``.

        A stage that is an ``nn.Sequential`` of blocks gets per-block
        activation checkpointing from ``with_cp``.
        """

    @abstractmethod
    def stage_module_names(self, i: int) -> Tuple[str, ...]:
        """Dotted names of stage ``i``'s modules, in forward order.

        It must answer for every stage, built or not: the loader uses it to
        recognise checkpoint keys of stages that were not built.
        """

    def stem_module_names(self) -> Tuple[str, ...]:
        """Dotted names of the stem's modules, in forward order: those
        :meth:`build_stem` returned."""
        return self._built_stem

    # ------------------------------------------------------------------
    # Metadata.
    @property
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each output, in output order."""
        return tuple(self.stage_channels[i] for i in self.out_indices)

    @property
    def out_strides(self) -> Tuple[int, ...]:
        """Stride of each output relative to the input, in output order."""
        return tuple(self.stage_strides[i] for i in self.out_indices)

    @property
    def norm1(self) -> nn.Module:
        """The stem's norm under mmdet's public name, for families that
        name it as mmdet's ResNet and RegNet do (``norm1_name``: ``bn1``,
        ``gn1``, ...). ``AttributeError`` otherwise, as in mmdet (a deep
        stem has no single norm)."""
        name = getattr(self, 'norm1_name', None)
        if name is None or name not in self._modules:
            raise AttributeError(
                f'{type(self).__name__} has no stem norm named norm1 '
                '(mmdet has none either for this stem)')
        return self._modules[name]

    def unbuilt_module_names(self) -> Tuple[str, ...]:
        """Names of the modules of the stages that were not built, with
        their output norms (which checkpoints of other runs may have)."""
        return tuple(name for i in range(self.num_built_stages,
                                         self.num_stages)
                     for name in (*self.stage_module_names(i),
                                  f'out_norms.{i}'))

    def unused_output_prefixes(self) -> Tuple[str, ...]:
        """The output norms of built stages that are not outputs (a detector
        trained with other ``out_indices`` has them)."""
        return tuple(f'out_norms.{i}.' for i in range(self.num_built_stages)
                     if i not in self.out_indices)

    def stem_modules(self) -> List[nn.Module]:
        return [self.get_submodule(n) for n in self._stem_names]

    def stage_modules(self, i: int) -> List[nn.Module]:
        if not 0 <= i < self.num_built_stages:
            raise ValueError(f'stage {i} is not built; built stages are '
                             f'0..{self.num_built_stages - 1}')
        return [self.get_submodule(n) for n in self._stage_names[i]]

    def frozen_module_names(self) -> Tuple[str, ...]:
        """Names of the stem and stage modules that ``frozen_stages``
        freezes (only built stages)."""
        if self.frozen_stages < 0:
            return ()
        names = list(self._stem_names)
        for i in range(min(self.frozen_stages, self.num_built_stages)):
            names += self._stage_names[i]
        return tuple(names)

    # ------------------------------------------------------------------
    # Freezing and train/eval state.
    def stem_parameter_names(self) -> Tuple[str, ...]:
        """Family hook: stem parameters that live outside the stem's modules
        (e.g. a ViT's ``pos_embed``, held by the model itself). Frozen with
        the stem."""
        return ()

    def _freeze(self) -> None:
        for name in self.frozen_module_names():
            module = self.get_submodule(name)
            if self.frozen_bn:
                module = freeze_batch_norms(module)
                self.set_submodule(name, module)
            module.eval()
            module.requires_grad_(False)
        if self.frozen_stages >= 0:
            for name in self.stem_parameter_names():
                self.get_parameter(name).requires_grad_(False)

    def train(self, mode: bool = True) -> 'VBBackbone':
        """Set train/eval mode, keeping frozen modules (and, with
        ``norm_eval``, every batch norm) in eval mode."""
        super().train(mode)
        if mode:
            for name in self.frozen_module_names():
                self.get_submodule(name).eval()
            if self.norm_eval:
                for module in self.modules():
                    if is_batch_norm(module):
                        # NOTE: the norm only: a norm-act layer's (timm's
                        # BatchNormAct2d) drop and act children keep `mode`.
                        module.training = False
        return self

    # ------------------------------------------------------------------
    # Forward.
    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.with_cp and self.training and torch.is_grad_enabled()):
            return module(x)
        blocks = module if isinstance(module, nn.Sequential) else [module]
        for block in blocks:
            x = cp.checkpoint(block, x, use_reentrant=False)
        return x

    def stage_output(self, i: int, x: torch.Tensor,
                     input_size: Tuple[int, int]) -> torch.Tensor:
        """Family hook: turn stage ``i``'s raw map into its NCHW output (e.g.
        from NHWC, or through a pyramid level) for an input of
        ``input_size`` (H, W). The next stage still receives the untouched
        map; the output norm is applied after."""
        return x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.stem_modules():
            x = module(x)
        return x

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``TypeError`` when ``x`` is not a tensor, a
        ``ValueError`` naming the expected shape when it is not an NCHW
        batch with the backbone's ``in_channels``, or naming
        :attr:`size_divisor` when its height or width is not a multiple of
        it, instead of an error deep inside the network. A shape comparison
        only."""
        channels = self.in_channels
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f'{type(self).__name__} takes a batch of images, a '
                f'torch.Tensor of shape (N, {channels}, H, W), got '
                f'{type(x).__name__}'
                + (' (stack a list of images with torch.stack)'
                   if isinstance(x, (list, tuple)) else ''))
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(
                f'{type(self).__name__} takes a batch of images of shape '
                f'(N, {channels}, H, W) (in_channels={channels}), got a '
                f'tensor of shape {tuple(x.shape)}')
        div = self.size_divisor
        if div > 1 and (x.shape[-2] % div or x.shape[-1] % div):
            raise ValueError(
                f'{self.describe()} needs inputs whose height and width are '
                f'multiples of {div} (size_divisor={div}), got '
                f'{x.shape[-2]}x{x.shape[-1]}: pad them (mmdet: '
                f'data_preprocessor.pad_size_divisor={div} or a multiple)')

    def describe(self) -> str:
        """How error messages name this backbone (its class name here)."""
        return type(self).__name__

    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Family hook: the raw map of every stage in ``out_indices``, in
        order. By default the stem and the built stages run as a chain (a
        family whose network is not a chain, such as timm's extractors,
        runs it its own way here)."""
        x = self.forward_stem(x)
        feats = []
        for i in range(self.num_built_stages):
            for module in self.stage_modules(i):
                x = self._run(module, x)
            if i in self.out_indices:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return the feature maps of ``out_indices``, in stage order: the
        input is checked, :meth:`forward_features` runs, then each map goes
        through :meth:`stage_output` and its output norm."""
        self.check_input(x)
        input_size = tuple(x.shape[-2:])
        outs = []
        for i, feat in zip(self.out_indices, self.forward_features(x)):
            out = self.stage_output(i, feat, input_size)
            if self.out_norm_cfg is not None:
                out = self.out_norms[str(i)](out)
            outs.append(out)
        return tuple(outs)

    # ------------------------------------------------------------------
    # Weights: LoadableModule routes a pretrained init_cfg through the
    # strict loader; load_hint and init_default_weights are family hooks.
    # ------------------------------------------------------------------
    # Inference and export forms.
    def set_fast_layers(self, enable: bool = True) -> None:
        """Family hook: switch the layers that have an equivalent, faster
        computation to it (``enable=False``: back), in place; parameters
        and state-dict keys do not change. :func:`vb_plugin.
        optimize_for_inference` (``conv_mlp=True``) and the ONNX export
        call it. Default: no such layers."""

    def to_fast_inference(self, enable: bool = True) -> 'VBBackbone':
        """The backbone in its fast eval form, in place: its fast layers
        (:meth:`set_fast_layers`) and ``channels_last`` weights;
        ``enable=False`` goes back. Outputs agree with the default form to
        float rounding. :func:`vb_plugin.optimize_for_inference` does this
        and more (BN folding, bf16, compile) on a copy.

        Returns:
            VBBackbone: ``self``.

        Example:
            >>> from vb_plugin import VBConvNeXt
            >>> model = VBConvNeXt(arch=dict(depths=[1, 1, 1, 1],
            ...                    channels=[8, 16, 32, 64])).eval()
            >>> x = torch.rand(1, 3, 64, 64)
            >>> ref = model(x)
            >>> fast = model.to_fast_inference()(x)
            >>> max((a - b).abs().max().item()
            ...     for a, b in zip(ref, fast)) < 1e-5
            True
        """
        self.set_fast_layers(enable)
        return self.to(memory_format=torch.channels_last
                       if enable else torch.contiguous_format)

    def prepare_export(self) -> None:
        """Family hook: make the forward traceable for ONNX export, in place
        and without changing its outputs (called by
        :func:`vb_plugin.deploy.export_onnx` on an eval-mode copy). By
        default the fast layers (:meth:`set_fast_layers`) are exported."""
        self.set_fast_layers(True)

    # ------------------------------------------------------------------
    # Layer-wise learning-rate decay (VBLayerDecayOptimizerConstructor).
    @property
    def lr_decay_num_layers(self) -> Optional[int]:
        """Family hook: ``paramwise_cfg['num_layers']`` of layer-wise
        learning-rate decay for this architecture (layer ids run from 0,
        the stem, to ``num_layers + 1``, everything after the backbone);
        None for a family without layer-wise decay (the default)."""
        return None

    def lr_decay_layer_id(self, name: str) -> int:
        """Family hook: the layer id of parameter ``name`` (relative to the
        backbone) for layer-wise decay, in ``0 .. lr_decay_num_layers +
        1``.

        Raises:
            ValueError: For a family without layer-wise decay (the
                default).
        """
        raise self.no_layer_decay()

    def no_layer_decay(self) -> ValueError:
        """The error for layer-wise decay on a family without it (a family
        hook: VBTimmBackbone names the models that have it)."""
        return ValueError(
            f'{self.describe()} has no layer-wise learning-rate decay '
            '(lr_decay_num_layers is None): use another optimizer '
            'constructor, or a family that numbers its layers '
            '(VBConvNeXt, a ViT-style VBTimmBackbone)')

    def layer_decay_paramwise_cfg(self, decay_rate: float = 0.95) -> dict:
        """``paramwise_cfg`` for layer-wise decay
        (``VBLayerDecayOptimizerConstructor`` or mmdet's), with
        ``num_layers`` taken from this architecture.

        Raises:
            ValueError: For a family without layer-wise decay.

        Example:
            >>> from vb_plugin import VBConvNeXt
            >>> VBConvNeXt(arch='small').layer_decay_paramwise_cfg()
            {'decay_rate': 0.95, 'decay_type': 'layer_wise', 'num_layers': 12}
        """
        if self.lr_decay_num_layers is None:
            raise self.no_layer_decay()
        return dict(decay_rate=decay_rate, decay_type='layer_wise',
                    num_layers=self.lr_decay_num_layers)


def _without_var_keyword(signature: inspect.Signature) -> inspect.Signature:
    return signature.replace(parameters=[
        p for p in signature.parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ])


# NOTE: VBBackbone's **unknown only turns a misspelt option into Python's
# TypeError naming the family; it is not an option.
VBBackbone.__init__.__signature__ = _without_var_keyword(
    inspect.signature(VBBackbone.__init__))


def _publish_contract_options(cls: type) -> None:
    """Give a family's ``__init__(..., **kwargs)`` the signature a user sees:
    its own options, then the contract options it passes to
    :class:`VBBackbone` through ``**kwargs`` (keyword-only, with the base's
    defaults). ``inspect.signature``, ``help()`` and docs/reference.md's
    test then list every option of the family, declared once here."""
    init = cls.__dict__.get('__init__')
    if init is None:
        return
    signature = inspect.signature(init)
    if not any(p.kind is p.VAR_KEYWORD
               for p in signature.parameters.values()):
        return
    own = list(_without_var_keyword(signature).parameters.values())
    names = {p.name for p in own}
    base = inspect.signature(VBBackbone.__init__).parameters
    contract = [
        p.replace(kind=p.KEYWORD_ONLY) for name, p in base.items()
        if name != 'self' and name not in FAMILY_SET and name not in names
    ]
    init.__signature__ = signature.replace(parameters=own + contract)
