"""Backbone families. Importing this registers them in mmengine's MODELS.

Every module or package in this folder except the shared ones
(:data:`SHARED`: the contract in :mod:`.base`, the conv families' pieces in
:mod:`.common`) is a family: it is imported here, and the names in its
``__all__`` are this package's (so ``vb_plugin.models.VBResNet`` and
``vb_plugin.VBResNet``). A new family is one file here and nothing more in
this package (docs/adding_a_family.md).

Example:
    >>> sorted(FAMILIES)
    ['VBConvNeXt', 'VBRegNet', 'VBResNet', 'VBTimmBackbone']
"""
import importlib
import inspect
import pkgutil
from typing import Dict

from .base import VBBackbone, check_frozen_stages, resolve_out_indices

#: Modules of this package that are not families.
SHARED = ('base', 'common')

__all__ = ['FAMILIES', 'VBBackbone', 'check_frozen_stages',
           'resolve_out_indices']

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name in SHARED:
        continue
    _family = importlib.import_module(f'{__name__}.{_info.name}')
    if not hasattr(_family, '__all__'):
        raise ImportError(f'{_family.__name__} is in vb_plugin/models, so it '
                          'is a family, but it has no __all__: list the '
                          'names it exports (its VBBackbone class first)')
    for _name in _family.__all__:
        globals()[_name] = getattr(_family, _name)
        __all__.append(_name)

#: Every family by class name: the concrete ``VBBackbone`` subclasses the
#: family modules export.
FAMILIES: Dict[str, type] = {
    name: value for name, value in sorted(globals().items())
    if isinstance(value, type) and issubclass(value, VBBackbone)
    and value is not VBBackbone and not inspect.isabstract(value)
}
