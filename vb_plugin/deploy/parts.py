"""What of a detector goes on an engine or into an ONNX file: the
backbone, or the backbone and its neck as one module."""
import torch
from torch import nn

#: What of a detector goes on the engine (or into the ONNX file).
PARTS = ('backbone', 'backbone+neck')


def check_part(part: str) -> None:
    """Raise ``ValueError`` unless ``part`` is one of :data:`PARTS`.

    Example:
        >>> check_part('backbone+neck')
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not valid; use 'backbone' or "
                         "'backbone+neck'")


class BackboneWithNeck(nn.Module):
    """A backbone and its neck as one module (to export or deploy both).

    Example:
        >>> from mmdet.models.necks import FPN
        >>> from vb_plugin import VBResNet
        >>> bb = VBResNet(depth=18, base_channels=8)
        >>> m = BackboneWithNeck(bb, FPN(list(bb.out_channels), 16, 5))
        >>> [o.shape[-1] for o in m(torch.rand(1, 3, 64, 64))]
        [16, 8, 4, 2, 1]
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.in_channels = getattr(backbone, 'in_channels', 3)
        self.size_divisor = getattr(backbone, 'size_divisor', 1)
        # NOTE: the pair is in the backbone's mode (a new module is in
        # training mode, and train()/eval() on it reach both parts).
        self.train(backbone.training)

    def forward(self, x: torch.Tensor):
        return tuple(self.neck(self.backbone(x)))
