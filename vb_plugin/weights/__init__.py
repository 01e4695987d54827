"""Pretrained weights: safe reading, layout rules and strict loading."""
from .io import (SAFE_GLOBALS, CheckpointError, extract_state_dict,
                 read_checkpoint, resolve_checkpoint_path)
from .loader import LoadReport, load_pretrained
from .rules import WeightSource, select_source

__all__ = [
    'SAFE_GLOBALS', 'CheckpointError', 'LoadReport', 'WeightSource',
    'extract_state_dict', 'load_pretrained', 'read_checkpoint',
    'resolve_checkpoint_path', 'select_source'
]
