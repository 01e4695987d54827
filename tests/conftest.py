import contextlib
import random

import numpy as np
import pytest
import torch

import vb_plugin  # noqa: F401  (registers the backbones)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield


def pytest_configure(config):
    torch.set_num_threads(2)
    config.addinivalue_line(
        'markers', 'slow: end-to-end tests left out of `make test`; run '
        'them with `make test-all`')
    config.addinivalue_line(
        'markers', 'cuda: needs a CUDA device; skipped (with the reason) '
        'where torch.cuda.is_available() is False; `-m cuda` runs them '
        '(tools/gpu_check.sh)')


#: Why a `cuda` test is skipped on this machine (None: it runs).
NO_CUDA = None if torch.cuda.is_available() else (
    'needs a CUDA device: torch.cuda.is_available() is False')


def pytest_collection_modifyitems(config, items):
    if NO_CUDA is None:
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def tf32_settings(conv: bool, matmul: bool):
    """Set torch's TF32 flags for CUDA convolutions and matmuls inside the
    block, through the fp32_precision settings where torch has them (else
    the older allow_tf32 flags), and restore them after."""
    cudnn_conv = getattr(torch.backends.cudnn, 'conv', None)
    matmul_backend = torch.backends.cuda.matmul
    if hasattr(cudnn_conv, 'fp32_precision'):
        saved = cudnn_conv.fp32_precision, matmul_backend.fp32_precision
        values = ['tf32' if flag else 'ieee' for flag in (conv, matmul)]
        cudnn_conv.fp32_precision, matmul_backend.fp32_precision = values
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul_backend.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul_backend.allow_tf32
        torch.backends.cudnn.allow_tf32, matmul_backend.allow_tf32 = (
            conv, matmul)
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul_backend.allow_tf32 = \
                saved


def randomize_bn(model):
    """Non-trivial batch-norm statistics and affine terms (every BN-like
    layer), so that a wrong mapping or conversion shows. Returns the model.
    """
    from vb_plugin.layers import is_batch_norm
    with torch.no_grad():
        for m in model.modules():
            if is_batch_norm(m):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two tensors or tuples of them."""
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b), (len(a), len(b))
        return max(max_abs_diff(x, y) for x, y in zip(a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture
def save_state(tmp_path):
    """Save a state dict (or any object) with torch.save; return the path."""
    counter = iter(range(10**6))

    def save(obj, name=None):
        path = tmp_path / (name or f'ckpt{next(counter)}.pth')
        if str(path).endswith('.safetensors'):
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
        else:
            torch.save(obj, path)
        return path

    return save


MASK_RCNN_LOSSES = ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox',
                    'loss_mask', 'loss')


def train_step_and_predict(model, batch, lr=0.01):
    """One SGD training step with mmdet's losses, then one prediction.

    Returns:
        tuple: The logged losses of the step and the predicted data samples.
    """
    from mmengine.optim import OptimWrapper
    params = [p for p in model.parameters() if p.requires_grad]
    optim = OptimWrapper(torch.optim.SGD(params, lr=lr, momentum=0.9))
    model.train()
    losses = model.train_step(batch, optim)
    model.eval()
    with torch.no_grad():
        preds = model.test_step(batch)
    return losses, preds


def checked_train_step(model, batch, frozen_prefixes=None):
    """One training step and a prediction of a Mask R-CNN
    (:func:`train_step_and_predict`), checking what every
    family's config test checks: every Mask R-CNN loss is finite, backbone
    parameters with ``requires_grad=False`` are unchanged, and some trainable
    backbone parameter changed. With ``frozen_prefixes``, the frozen
    parameters must exist and all start with one of them.

    Returns:
        tuple: ``(losses, preds, before)``, ``before`` being the backbone's
        parameters before the step.
    """
    backbone = model.backbone
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    frozen = [n for n, p in backbone.named_parameters()
              if not p.requires_grad]
    if frozen_prefixes is not None:
        assert frozen, 'no frozen backbone parameters'
        assert all(n.startswith(frozen_prefixes) for n in frozen), frozen
    losses, preds = train_step_and_predict(model, batch)
    for key in MASK_RCNN_LOSSES:
        assert key in losses and torch.isfinite(losses[key]), key
    params = dict(backbone.named_parameters())
    for n in frozen:
        assert torch.equal(params[n], before[n]), n
    assert any(not torch.equal(params[n], before[n])
               for n in params if n not in frozen)
    return losses, preds, before
