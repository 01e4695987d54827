"""Pretrained weights: safe reading, layout rules and strict loading."""
from .io import (SAFE_GLOBALS, CheckpointError, extract_state_dict,
                 install_safe_mmengine_loader, read_checkpoint,
                 resolve_checkpoint_path)
from .loader import LoadReport, load_pretrained
from .rules import WeightSource, select_source

__all__ = [
    'SAFE_GLOBALS', 'CheckpointError', 'LoadReport', 'WeightSource',
    'extract_state_dict', 'install_safe_mmengine_loader', 'load_pretrained',
    'read_checkpoint', 'resolve_checkpoint_path', 'select_source'
]
