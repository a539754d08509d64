"""A linear or convolution layer followed by the BatchNorm that folds into it.

``LayerBN`` is FusionFormer's unit: in training form it is ``layer -> MaskedBatchNorm``
with a plain state_dict (``layer.weight``, ``bn.running_mean``, ...); its
``fuse_()`` folds the BatchNorm into the layer with ``torch.nn.utils.fusion``
and deletes it (the fused form). Without ``batch_norm`` it is just the layer, so the
reference Conformer and the ablations share the same code path.
"""

from typing import Optional, Union

import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from espnet_fusionformer.norm import MaskedBatchNorm

Layer = Union[torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d]


class Fusable(torch.nn.Module):
    """A module with a fused form. ``fuse_()`` must be idempotent."""

    def fuse_(self) -> None:
        raise NotImplementedError


def check_eval(module: torch.nn.Module) -> None:
    """Raise if ``module`` (or any submodule) is in training mode."""
    if any(m.training for m in module.modules()):
        raise RuntimeError(
            "BatchNorm folding needs eval mode (running statistics); "
            "call model.eval() before fuse()"
        )


class LayerBN(Fusable):
    """``layer`` then an optional ``MaskedBatchNorm`` over its output channels, then
    an optional ReLU (fused with the BatchNorm in training).

    Args:
        layer: ``torch.nn.Linear`` on ``(B, T, C)`` or ``torch.nn.Conv1d/Conv2d`` on
            ``(B, C, T[, F])``.
        batch_norm: append a BatchNorm. (Default: ``True``)
        sync: cross-rank statistics of the BatchNorm (see ``MaskedBatchNorm``).
        relu: apply ReLU to the output. (Default: ``False``)
    """

    def __init__(
        self,
        layer: Layer,
        batch_norm: bool = True,
        sync: Optional[bool] = None,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.relu = relu
        channels = layer.out_features if isinstance(layer, torch.nn.Linear) else None
        channel_dim = -1
        if channels is None:
            channels, channel_dim = layer.out_channels, 1
        self.bn = (
            MaskedBatchNorm(channels, channel_dim=channel_dim, sync=sync)
            if batch_norm
            else None
        )

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Apply the layer, then the BatchNorm (statistics over ``mask``'s frames).

        Args:
            x: ``(B, T, Cin)`` for Linear, ``(B, Cin, T[, F])`` for convolutions.
            mask: bool, True on valid frames, broadcastable to the output.
        """
        if self.bn is not None:
            return self.bn(self.layer(x), mask, self.relu)
        if isinstance(self.layer, torch.nn.Linear):
            # skip the module call: the hottest path of the fused form
            x = torch.nn.functional.linear(x, self.layer.weight, self.layer.bias)
        else:
            x = self.layer(x)
        return x.relu_() if self.relu else x

    def fuse_(self) -> None:
        """Fold the BatchNorm into ``layer`` and drop it (no-op once fused)."""
        if self.bn is None:
            return
        check_eval(self)
        if isinstance(self.layer, torch.nn.Linear):
            self.layer = fuse_linear_bn_eval(self.layer, self.bn)
        else:
            self.layer = fuse_conv_bn_eval(self.layer, self.bn)
        self.bn = None


def linear_bn(
    in_features: int,
    out_features: int,
    batch_norm: bool,
    sync: Optional[bool] = None,
    relu: bool = False,
) -> LayerBN:
    """``Linear(in, out)`` + BatchNorm (+ ReLU); the bias moves into the BatchNorm's
    beta."""
    linear = torch.nn.Linear(in_features, out_features, bias=not batch_norm)
    return LayerBN(linear, batch_norm, sync, relu)


def scale_bn_inputs_(module: torch.nn.Module, scale: float) -> None:
    """Multiply the weight of every layer of ``module`` that a BatchNorm follows by
    ``scale`` (an initialization: the BatchNorm makes the output independent of it,
    so under Adam it sets the layer's effective step ``lr / |w|``)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"bn_init_scale must be > 0, got {scale}")
    if scale == 1.0:
        return
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LayerBN) and m.bn is not None:
                m.layer.weight.mul_(scale)
