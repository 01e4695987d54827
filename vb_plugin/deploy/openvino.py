"""OpenVINO as an engine: one ``Core`` per process, a compiled model and
its infer request, and the ONNX ops OpenVINO does not compute as torch."""
import functools
import tempfile
from pathlib import Path
from typing import List


def _cubic_resizes(onnx_model: bytes) -> List[str]:
    import onnx
    graph = onnx.load_from_string(onnx_model).graph
    return [n.name for n in graph.node if n.op_type == 'Resize' and any(
        a.name == 'mode' and a.s == b'cubic' for a in n.attribute)]


def check_openvino_ops(onnx_model: bytes, name: str = 'the model') -> None:
    """Raise ``ValueError`` for ONNX ops that OpenVINO runs differently.

    OpenVINO 2026.4's ``Resize`` in cubic mode does not reproduce torch's
    bicubic interpolation (measured: max abs diff 2e-3 at the identity size
    and 0.03-0.07 at upsampling, where onnxruntime gives <= 2e-6). timm's
    ViT, DeiT, DINOv2 and EVA at any input size resample their position
    embedding with it.
    """
    cubic = _cubic_resizes(onnx_model)
    if cubic:
        raise ValueError(
            f"backend='openvino' cannot run {name}: its ONNX graph has "
            f'{len(cubic)} bicubic Resize node(s) ({cubic[0]}, e.g. timm\'s '
            'position-embedding resampling at any input size), which '
            "OpenVINO does not compute as torch does; use "
            "backend='onnxruntime'")


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one OpenVINO ``Core``.

    One Core for every engine model: creating Cores over and over in one
    process (one per compiled model) ends in a segmentation fault (seen
    here in the test suite, and reported by other OpenVINO users), and a
    compiled model must not outlive the Core whose plugin made it.
    """
    import openvino as ov
    return ov.Core()


class OpenVINORun:
    """An OpenVINO compiled model and its infer request."""

    def __init__(self, onnx_model: bytes, dtype: str, threads: int) -> None:
        core = openvino_core()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'model.onnx'
            path.write_bytes(onnx_model)
            model = core.read_model(str(path))
        config = {
            'INFERENCE_PRECISION_HINT': 'bf16' if dtype == 'bf16' else 'f32',
            'INFERENCE_NUM_THREADS': int(threads),
            'PERFORMANCE_HINT': 'LATENCY',
            'NUM_STREAMS': 1,
        }
        self.compiled = core.compile_model(model, 'CPU', config)
        del model
        self.request = self.compiled.create_infer_request()
        self.num_outputs = len(self.compiled.outputs)

    def __call__(self, array):
        self.request.infer({0: array})
        return [self.request.get_output_tensor(i).data.copy()
                for i in range(self.num_outputs)]

    def __del__(self):
        # NOTE: the request before the model it was made from.
        for name in ('request', 'compiled'):
            self.__dict__.pop(name, None)
