"""Timing callables against each other: interleaved rounds, with CUDA
work synchronised before each clock read. Used by ``'auto'`` in
:func:`vb_plugin.optimize_for_inference` and by the benchmark.
"""
import time
from typing import Callable, List, Sequence

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU.

    Example:
        >>> sync(torch.device('cpu'))
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(fns: Sequence[Callable[[], object]],
                     iters: int,
                     device: torch.device = torch.device('cpu'),
                     grad: bool = False) -> List[List[float]]:
    """Time ``iters`` runs of every callable, interleaved.

    Round ``i`` runs each callable once, starting with callable ``i mod n``,
    so a change in the machine's load during the run (a shared machine)
    hits every row alike instead of whichever row ran at that moment, and
    no row always runs right after the same other one. Runs under
    ``torch.inference_mode`` unless ``grad``; CUDA work is synchronised
    before each clock read.

    Returns:
        list: One list of ``iters`` times in ms per callable.

    Example:
        >>> times = time_interleaved([lambda: torch.ones(8).sum()] * 2, 3)
        >>> [len(t) for t in times]
        [3, 3]
    """
    ctx = torch.enable_grad if grad else torch.inference_mode
    n = len(fns)
    times: List[List[float]] = [[] for _ in range(n)]
    with ctx():
        sync(device)
        for i in range(iters):
            for k in range(n):
                j = (i + k) % n
                start = time.perf_counter()
                fns[j]()
                sync(device)
                times[j].append((time.perf_counter() - start) * 1e3)
    return times
