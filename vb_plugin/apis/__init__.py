"""Library side of ``tools/``: configs, neck wiring, runners, the demo.

The scripts in ``tools/`` only parse arguments and call these functions.
One job per module: :mod:`.config` (read configs, wire the neck, build the
detector), :mod:`.runner` (the Runner set-up of the train and test tools),
:mod:`.demo` (the toy demo), :mod:`.synthetic` (a synthetic batch in
mmdet's data format) and :mod:`.cli` (the arguments the tools share).
"""
from .config import build_detector, load_config, wire_neck_channels
from .demo import metric_lines, run_demo
from .runner import build_runner, setup_runner_config
from .synthetic import synthetic_detection_batch

__all__ = [
    'build_detector', 'build_runner', 'load_config', 'metric_lines',
    'run_demo', 'setup_runner_config', 'synthetic_detection_batch',
    'wire_neck_channels'
]
