"""The options of a timm model that VBTimmBackbone checks before building
it: the model name and the ``timm.create_model`` keywords."""
import difflib
from typing import Optional

import timm

#: create_model keywords this family sets itself; ``model_kwargs`` must not.
RESERVED_KWARGS = ('pretrained', 'features_only', 'out_indices', 'in_chans',
                   'num_classes', 'feature_cls', 'pretrained_cfg_overlay',
                   'output_stride', 'scriptable', 'exportable')


def check_model_name(model_name: str) -> None:
    """Raise ``TypeError``/``ValueError`` (with close matches) unless
    ``model_name`` is a timm model name.

    Example:
        >>> check_model_name('resnet50')
        >>> check_model_name('resnet5O')
        Traceback (most recent call last):
        ...
        ValueError: model_name='resnet5O' is not a timm model; close matches: ['resnet50', 'resnet51q', 'resnet50t', 'resnet50s', 'resnet50d']
    """
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f'model_name must be a timm model name (str), got '
                        f'{model_name!r} ({type(model_name).__name__})')
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5,
                                      cutoff=0.6)
    hint = (f'; close matches: {close}' if close else
            '; see timm.list_models() for the available names')
    raise ValueError(f'model_name={model_name!r} is not a timm model{hint}')


def model_options(model_kwargs: Optional[dict],
                  output_stride: Optional[int] = None,
                  drop_path_rate: Optional[float] = None) -> dict:
    """``model_kwargs`` checked, with ``output_stride`` and
    ``drop_path_rate`` added.

    Raises:
        ValueError: If ``model_kwargs`` sets a keyword of
            :data:`RESERVED_KWARGS`, or ``output_stride`` is not 8, 16, 32
            or None.

    Example:
        >>> model_options(dict(img_size=256), 16)
        {'img_size': 256, 'output_stride': 16}
    """
    model_kwargs = dict(model_kwargs or {})
    reserved = sorted(set(model_kwargs) & set(RESERVED_KWARGS))
    if reserved:
        raise ValueError(
            f'model_kwargs must not set {reserved}: VBTimmBackbone sets '
            'them itself (use in_channels, output_stride, out_indices, '
            'init_cfg)')
    if output_stride is not None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f'output_stride={output_stride!r} is not '
                             'valid; use 8, 16, 32 or None')
        model_kwargs['output_stride'] = output_stride
    if drop_path_rate is not None:
        model_kwargs['drop_path_rate'] = drop_path_rate
    return model_kwargs
