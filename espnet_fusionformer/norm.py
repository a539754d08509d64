"""Normalization layers that take the padding mask.

``MaskedBatchNorm`` computes its training statistics over valid (non-padded) frames
only, optionally reduced across ``torch.distributed`` ranks, so neither padding nor
the way a batch is split over GPUs changes what the model learns. In eval mode it is
an ordinary affine BatchNorm with running statistics, which ``torch.nn.utils.fusion``
folds into the layer before it.
"""

from typing import List, Optional

import torch


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (the backward pass sums gradients too)."""
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x)


class MaskedBatchNorm(torch.nn.BatchNorm1d):
    r"""BatchNorm whose training statistics ignore padded frames.

    The state_dict is that of :class:`torch.nn.BatchNorm1d` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so it folds with
    ``torch.nn.utils.fusion`` and averages/packs like any ESPnet checkpoint.

    Args:
        num_features: number of channels ``C``.
        channel_dim: dimension of ``C`` in the input: ``-1`` for ``(B, T, C)``,
            ``1`` for ``(B, C, T)`` and ``(B, C, T, F)``. (Default: ``-1``)
        sync: reduce the masked statistics across ``torch.distributed`` ranks;
            ``None`` turns it on whenever the world size is > 1. (Default: ``None``)
        eps, momentum: as in :class:`torch.nn.BatchNorm1d`.
    """

    def __init__(
        self,
        num_features: int,
        channel_dim: int = -1,
        sync: Optional[bool] = None,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.channel_dim = channel_dim
        self.sync = sync

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}"

    def _shape(self, x: torch.Tensor) -> List[int]:
        """Shape that broadcasts a ``(C,)`` vector along ``channel_dim`` of ``x``."""
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return shape

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Normalize ``x``.

        Args:
            x: ``(B, T, C)``, ``(B, C, T)`` or ``(B, C, T, F)`` (see ``channel_dim``).
            mask: bool, True on valid frames, broadcastable to ``x``, e.g.
                ``(B, T, 1)``, ``(B, 1, T)`` or ``(B, 1, T, 1)``; ``None``: all valid.

        Returns:
            Tensor shaped like ``x``.
        """
        shape = self._shape(x)
        if not self.training:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return x * scale.view(shape) + shift.view(shape)

        momentum = self.momentum
        self.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as torch's BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        sync = self.sync if self.sync is not None else _distributed_world_size() > 1
        if sync:
            return self._forward_synced(x, mask, shape, momentum)
        channel_dim = self.channel_dim % x.dim()
        if mask is None or bool(mask.all()):
            if channel_dim == 1:
                return self._native(x, momentum)
            return self._native(x.reshape(-1, x.size(-1)), momentum).view_as(x)
        # gather the valid frames, normalize them with the fused kernel, scatter
        # back; padded frames are 0
        xt = x.movedim(channel_dim, -1)  # (..., C) view
        valid = mask.expand(x.shape).movedim(channel_dim, -1)[..., 0]  # (...)
        out = torch.zeros_like(xt)
        out[valid] = self._native(xt[valid], momentum)
        return out.movedim(-1, channel_dim)

    def _native(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        """Training-mode ``torch.batch_norm`` on ``(N, C, ...)``."""
        if x.numel() // x.size(1) < 2:
            raise ValueError(
                "MaskedBatchNorm needs at least 2 valid frames per batch, "
                f"got {x.numel() // x.size(1)}"
            )
        return torch.nn.functional.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
        )

    def _forward_synced(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        shape: List[int],
        momentum: float,
    ) -> torch.Tensor:
        """Training statistics over the valid frames of every rank."""
        dims = [d for d in range(x.dim()) if d != self.channel_dim % x.dim()]
        if mask is None:  # no padding
            mask = torch.ones([1] * x.dim(), dtype=torch.bool, device=x.device)
        weight = mask.to(x.dtype)
        # frames per channel: valid mask entries times the dims the mask broadcasts
        count = weight.sum() * (
            x.numel() // (weight.numel() * x.size(self.channel_dim))
        )
        count = count.reshape(1)
        total = (x * weight).sum(dims)
        count, total = _all_reduce(torch.cat([count, total])).split([1, total.numel()])
        if float(count) < 2:
            raise ValueError(
                "MaskedBatchNorm needs at least 2 valid frames per batch, "
                f"got {int(count)}"
            )
        mean = total / count
        centered = x - mean.view(shape)
        var = _all_reduce((centered * centered * weight).sum(dims)) / count

        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * count / (count - 1), momentum)

        scale = self.weight * torch.rsqrt(var + self.eps)
        out = centered * scale.view(shape) + self.bias.view(shape)
        return out.masked_fill(~mask, 0.0)  # padded frames are 0, as in forward()


class MaskedLayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` over the last dim with the ``(x, mask)`` signature.

    LayerNorm is per frame, so ``mask`` is unused; it is only there so that every
    norm in the encoder is called the same way.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return super().forward(x)


def make_norm(kind: Optional[str], size: int, sync: Optional[bool] = None):
    """Return the pre-norm of a block: ``"layer"``, ``"batch"`` or ``None``."""
    if kind is None:
        return None
    if kind == "layer":
        return MaskedLayerNorm(size, eps=1e-12)
    if kind == "batch":
        return MaskedBatchNorm(size, sync=sync)
    raise ValueError(f"unknown norm kind {kind!r}: use 'layer', 'batch' or None")
