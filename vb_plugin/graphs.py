"""CUDA graphs for an inference form: :class:`CUDAGraphCache`.

A CUDA graph records the kernels of one forward pass and replays them with
one launch, so the CPU no longer issues each kernel: it saves the launch
overhead of every layer, which counts when the GPU is fast and the batch
small. A graph is fixed to the shapes, dtypes and memory addresses it was
recorded with. :class:`CUDAGraphCache` records one graph per input
signature (shape, dtype, device), up to ``max_graphs``; an input with a new
signature beyond that runs the eager module (a warning says so once).

It is for inference: graphs are recorded under ``torch.no_grad`` and the
outputs carry no autograd history. (``torch.cuda.make_graphed_callables``
records a backward too, for training.)
"""
import copy
import warnings
from typing import Callable, Dict, Tuple

import torch

#: How many input signatures an inference form records a graph for before
#: further new ones run eagerly (each graph keeps its own memory pool).
MAX_CUDA_GRAPHS = 4

#: Eager runs before a graph is recorded (cuDNN/cuBLAS pick their
#: algorithms and workspaces there, outside the capture).
WARMUP_RUNS = 3

_Key = Tuple[Tuple[int, ...], torch.dtype, torch.device]


class _Graph:
    """One recorded forward pass: its graph and static input and outputs."""

    def __init__(self, fn: Callable, x: torch.Tensor) -> None:
        # NOTE: recorded outside inference mode, so that the static tensors
        # are normal tensors that a call in any grad mode can copy into.
        with torch.inference_mode(False), torch.no_grad():
            self.input = torch.empty_like(x)
            self.input.copy_(x)
            stream = torch.cuda.Stream(device=x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    fn(self.input)
            torch.cuda.current_stream(x.device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(self.input)

    def __call__(self, x: torch.Tensor):
        self.input.copy_(x)
        self.graph.replay()
        return self.output


class CUDAGraphCache:
    """Runs ``fn`` on CUDA inputs through a CUDA graph per input signature.

    The first call with a given (shape, dtype, device) runs ``fn`` a few
    times on a side stream, records a graph of one more call and replays it;
    later calls with that signature copy their input into the graph's
    static input and replay. At most ``max_graphs`` signatures are recorded;
    an input with another signature runs ``fn`` itself (one warning).

    The outputs returned are the graph's static outputs, which the next
    replay overwrites: the caller copies them (:class:`~vb_plugin.inference.
    InferenceModel` does). ``fn`` must be capturable: no CPU
    synchronisation (``.item()``, data-dependent shapes) and no host-to-device
    copies of new tensors. A copy of the cache (``copy.deepcopy``) starts
    empty.

    Args:
        fn (callable): A function of one tensor, e.g. an ``nn.Module``.
        max_graphs (int): Signatures recorded. Defaults to
            :data:`MAX_CUDA_GRAPHS`.

    Example:
        >>> cache = CUDAGraphCache(torch.nn.Identity(), max_graphs=2)
        >>> cache.max_graphs, cache.signatures
        (2, [])
    """

    def __init__(self, fn: Callable, max_graphs: int = MAX_CUDA_GRAPHS
                 ) -> None:
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) \
                or max_graphs < 0:
            raise ValueError(f'max_graphs={max_graphs!r} is not valid; it '
                             'must be an int >= 0')
        self.fn = fn
        self.max_graphs = max_graphs
        self._graphs: Dict[_Key, _Graph] = {}
        self._warned = False

    @property
    def signatures(self):
        """The (shape, dtype, device) of each recorded graph, in order."""
        return list(self._graphs)

    def clear(self) -> None:
        """Drop every graph (and its memory pool)."""
        self._graphs.clear()

    def __deepcopy__(self, memo) -> 'CUDAGraphCache':
        # NOTE: graphs point at this copy's weights; a copy records its own.
        return CUDAGraphCache(copy.deepcopy(self.fn, memo), self.max_graphs)

    def __call__(self, x: torch.Tensor):
        if not x.is_cuda:
            raise ValueError(f'CUDA graphs need a CUDA input; got one on '
                             f'{x.device}')
        key = (tuple(x.shape), x.dtype, x.device)
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= self.max_graphs:
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f'CUDA graphs: input {tuple(x.shape)} {x.dtype} is a '
                        f'new signature beyond the {self.max_graphs} '
                        'recorded (max_graphs); inputs with new signatures '
                        'run the eager form')
                return self.fn(x)
            graph = self._graphs[key] = _Graph(self.fn, x)
        return graph(x)
