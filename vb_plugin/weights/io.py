"""Reading checkpoint files safely.

A checkpoint is untrusted input: unpickling it can run arbitrary code. Files
are read with ``torch.load(weights_only=True)``, which refuses every global
that is not allow-listed, or with safetensors. The allow-list
:data:`SAFE_GLOBALS` holds exactly the types that mmengine's Runner writes
into its checkpoints (numpy arrays and scalars in ``meta``, ``HistoryBuffer``
in ``message_hub``), so detector checkpoints trained with mmdet load too.

detectron2's model-zoo files (``.pkl``: ``{'model': {name: numpy array},
'__author__': ..., 'matching_heuristics': ...}``, pickled without torch) are
read by :class:`NumpyUnpickler`, which constructs numpy arrays, dtypes and
scalars and nothing else: any other global (``os.system``, ``eval``, a
class) raises :class:`CheckpointError` naming it, before it is called. The
arrays become torch tensors (``torch.from_numpy``). ``pickle.load`` and
``torch.load(weights_only=False)`` are never used.
"""
import io
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint could not be read, recognised or loaded strictly."""


try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray


def _history_buffer_method(owner: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling.

    mmengine's ``HistoryBuffer`` pickles its statistics methods as
    ``getattr(HistoryBuffer, 'mean')``. Allowing the real ``getattr`` would
    let a pickle walk from any allowed object to ``eval``; this resolves
    only public methods of ``HistoryBuffer``.
    """
    method = getattr(HistoryBuffer, name, None) \
        if owner is HistoryBuffer and not name.startswith('_') else None
    if not callable(method):
        raise CheckpointError(
            f'refused getattr({owner!r}, {name!r}) while unpickling: only '
            'public HistoryBuffer methods are allowed')
    return method


#: Globals that ``weights_only`` unpickling may construct, beyond torch's own:
#: what mmengine's Runner writes into ``meta`` and ``message_hub``, and the
#: numpy RNG state that :class:`vb_plugin.engine.RNGStateHook` saves.
def _empty_bytes(*args: Any) -> bytes:
    """Stands in for ``bytes`` while unpickling.

    Pickle protocol 2 (``torch.save``'s) writes ``b''`` as a call to
    ``bytes()``; numpy writes an empty array's data that way, e.g. a
    ``HistoryBuffer`` that was never updated. Only that call is allowed:
    ``bytes(n)`` would let a pickle allocate ``n`` bytes.
    """
    if args:
        raise CheckpointError(
            f'refused bytes{args!r} while unpickling: only bytes() (the '
            'empty value) is allowed')
    return b''


SAFE_GLOBALS = [
    HistoryBuffer,
    (_history_buffer_method, 'builtins.getattr'),
    (_empty_bytes, 'builtins.bytes'),
    np.ndarray,
    np.dtype,
    # numpy 1 and 2 write these under different module names.
    *[(fn, f'{module}.{fn.__name__}')
      for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
      for fn in (_multiarray._reconstruct, _multiarray.scalar)],
    *{type(np.dtype(t)) for t in (np.float16, np.float32, np.float64,
                                  np.int8, np.int16, np.int32, np.int64,
                                  np.uint8, np.uint16, np.uint32, np.uint64,
                                  np.bool_)},
]

#: What :class:`NumpyUnpickler` may construct: ``(module, name)`` -> object.
#: numpy 1 writes ``numpy.core.multiarray``, numpy 2 ``numpy._core``.
NUMPY_GLOBALS = {
    **{(module, fn.__name__): fn
       for module in ('numpy.core.multiarray', 'numpy._core.multiarray')
       for fn in (_multiarray._reconstruct, _multiarray.scalar)},
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}


class NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and scalars in plain containers, and
    refuses every other global.

    Example:
        >>> import pickle
        >>> data = pickle.dumps({'w': np.ones(2, np.float32), 'n': 'x'})
        >>> NumpyUnpickler(io.BytesIO(data)).load()['w']
        array([1., 1.], dtype=float32)
        >>> NumpyUnpickler(io.BytesIO(pickle.dumps(print))).load()
        Traceback (most recent call last):
            ...
        vb_plugin.weights.io.CheckpointError: refused to unpickle the global builtins.print: a .pkl checkpoint may hold numpy arrays, dtypes and scalars only
    """

    def find_class(self, module: str, name: str) -> Any:
        found = NUMPY_GLOBALS.get((module, name))
        if found is None:
            raise CheckpointError(
                f'refused to unpickle the global {module}.{name}: a .pkl '
                'checkpoint may hold numpy arrays, dtypes and scalars only')
        return found


def _numpy_to_torch(obj: Any) -> Any:
    """Numpy arrays (and scalars) of ``obj``'s dicts, lists and tuples as
    torch tensors; everything else as it is."""
    if isinstance(obj, (np.ndarray, np.generic)):
        # NOTE: copy: an unpickled array may be read-only (and
        # torch.from_numpy warns on those) or not contiguous.
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, Mapping):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_to_torch(v) for v in obj)
    return obj


def read_pkl(path: PathLike) -> Any:
    """Read a detectron2-style ``.pkl`` file with :class:`NumpyUnpickler`;
    numpy arrays become torch tensors.

    Raises:
        CheckpointError: If the file needs a global other than numpy's
            arrays, dtypes and scalars, or is not a pickle.
    """
    data = Path(path).read_bytes()
    try:
        # NOTE: encoding='latin1': detectron2's older files were pickled by
        # Python 2, whose numpy arrays hold their bytes as str.
        obj = NumpyUnpickler(io.BytesIO(data), encoding='latin1').load()
    except CheckpointError as err:
        raise CheckpointError(f'{str(path)!r}: {err}') from err
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(
            f'could not unpickle {str(path)!r} as numpy arrays: {err}') \
            from err
    return _numpy_to_torch(obj)


_URL = re.compile(r'^[a-z][a-z0-9+.-]*://', re.IGNORECASE)


def resolve_checkpoint_path(checkpoint: PathLike) -> Path:
    """Map ``checkpoint`` to an existing local file.

    ``torchvision://NAME``, ``open-mmlab://NAME`` and ``http(s)://``
    addresses (as written in mmdet configs) are looked up in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``), where torchvision and mmengine store
    what they download. Nothing is downloaded here.

    Raises:
        CheckpointError: If no such local file exists.
    """
    text = os.fspath(checkpoint)
    if not _URL.match(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise CheckpointError(f'checkpoint file not found: {text!r}')
        return path
    url = text
    scheme, name = text.split('://', 1)
    if scheme in ('torchvision', 'open-mmlab', 'openmmlab'):
        from mmengine.runner import checkpoint as mmengine_ckpt
        urls = mmengine_ckpt.get_torchvision_models() \
            if scheme == 'torchvision' else mmengine_ckpt.get_external_models()
        name = mmengine_ckpt.get_deprecated_model_names().get(name, name) \
            if scheme != 'torchvision' else name
        if name not in urls:
            raise CheckpointError(
                f'checkpoint {text!r}: unknown {scheme} model {name!r}; '
                f'known names include {sorted(urls)[:8]}')
        url = urls[name]
    cached = Path(torch.hub.get_dir()) / 'checkpoints' / url.split('/')[-1]
    if cached.is_file():
        return cached
    raise CheckpointError(
        f'checkpoint {text!r} is not on this machine: vb_plugin reads local '
        f'files only and expected {str(cached)!r}. Download {url} to that '
        'path, or give a local file path.')


def read_checkpoint(checkpoint: PathLike, map_location: Any = 'cpu') -> Any:
    """Read a ``.pth``/``.pt``/``.bin``/``.ckpt``, ``.safetensors`` or
    detectron2 ``.pkl`` file.

    Pickled torch files are read with ``weights_only=True`` and the
    :data:`SAFE_GLOBALS` allow-list, ``.pkl`` files with
    :func:`read_pkl` (numpy arrays only, returned as tensors); a file that
    needs anything else (for example, one that tries to run code) is
    refused before it runs.

    Args:
        checkpoint (str | Path): See :func:`resolve_checkpoint_path`.
        map_location: As for ``torch.load``. Defaults to 'cpu'.

    Raises:
        CheckpointError: If the file is missing or refused.
    """
    path = resolve_checkpoint_path(checkpoint)
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
        device = map_location if isinstance(map_location, str) else 'cpu'
        return load_file(str(path), device=device)
    if path.suffix == '.pkl':
        return read_pkl(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location,
                              weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(
            f'refused to read {str(path)!r} with weights_only=True: it needs '
            'something beyond tensors, containers and the allow-listed '
            'types, and unpickling untrusted data can run code. '
            f'Reason: {err}') from err


def extract_state_dict(obj: Any) -> Tuple[Dict[str, torch.Tensor], str]:
    """Find the state dict in a checkpoint object.

    Accepts a bare state dict or one nested under ``state_dict``, ``model``,
    ``module`` or ``model_state`` (mmengine, official releases, DeepSpeed,
    pycls), and strips a DataParallel ``module.`` prefix.

    Returns:
        tuple: The state dict and the container key it came from ('' for a
        bare state dict).
    """
    container = ''
    if isinstance(obj, Mapping):
        for key in ('state_dict', 'model', 'module', 'model_state'):
            if isinstance(obj.get(key), Mapping):
                obj, container = obj[key], key
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError('checkpoint holds no state dict (expected a '
                              f'mapping of tensors, got {type(obj).__name__})')
    not_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise CheckpointError(
            f'checkpoint {container or "root"} is not a state dict: '
            f'{len(not_tensors)} entries are not tensors, e.g. '
            f'{not_tensors[:5]}')
    state = dict(obj)
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state, container


def install_safe_mmengine_loader() -> None:
    """Make mmengine read local checkpoints with :func:`read_checkpoint`.

    mmengine 0.10.7 calls ``torch.load`` without ``weights_only``. On torch
    >= 2.6 that means ``weights_only=True`` without the types its own Runner
    writes, so ``--resume`` and ``load_from`` fail with ``UnpicklingError``;
    on older torch it means unpickling arbitrary code. This replaces
    mmengine's loader for local paths (``load_checkpoint``,
    ``Runner.resume``, ``load_from``, ``PretrainedInit``) with the safe
    reader and its exact allow-list. ``import vb_plugin`` calls it.
    """
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(
        prefixes='', loader=read_checkpoint, force=True)
