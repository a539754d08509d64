"""Normalization layers that take the padding mask.

``MaskedBatchNorm`` computes its training statistics over valid (non-padded) frames
only, optionally reduced across ``torch.distributed`` ranks, so neither padding nor
the way a batch is split over GPUs changes what the model learns. In eval mode it is
an ordinary affine BatchNorm with running statistics, which ``torch.nn.utils.fusion``
folds into the layer before it.
"""

from typing import List, Optional, Tuple

import torch


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


# rows per block of the blocked reductions: about 1 MB of float32, so that the
# temporaries stay in cache (allocating tensors of 100 MB costs page faults)
_BLOCK = 1 << 18


def _blocks(rows: int, channels: int) -> List[Tuple[int, int]]:
    step = max(1, _BLOCK // channels)
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


class _MaskedBatchNormFunction(torch.autograd.Function):
    """Training-mode BatchNorm (+ ReLU) on ``(N, C)`` rows, statistics over the rows
    where ``mask`` (``(N, 1)``, 0/1) is 1.

    Plain tensor arithmetic: no device-to-host synchronization; statistics in
    float32 (or float64) whatever the input dtype, as mask-weighted sums over
    blocks of rows, so padded rows cost no gather/scatter and no large temporary.
    Across ranks it takes one all-reduce in the forward pass and one in the
    backward pass. Padded rows come out as 0 and get a zero gradient.
    """

    @staticmethod
    def forward(
        ctx, x, mask, weight, bias, running_mean, running_var, momentum, eps, relu, sync
    ):
        acc = mask.dtype
        with torch.autocast(x.device.type, enabled=False):
            m = mask[:, 0]
            channels = x.size(1)
            sums = x.new_zeros(2 * channels + 1, dtype=acc)  # sum x, sum x^2, n
            for i, j in _blocks(x.size(0), channels):
                block = x[i:j].to(acc)
                sums[:channels].addmv_(block.t(), m[i:j])
                sums[channels:-1].addmv_(block.square().t(), m[i:j])
            sums[-1] = m.sum()
            if sync:
                torch.distributed.all_reduce(sums)
            s1, s2, n = sums.split([channels, channels, 1])
            count = n.clamp(min=1)
            mean = s1 / count
            var = (s2 / count - mean * mean).clamp_(min=0)
            invstd = torch.rsqrt(var + eps)
            scale = weight * invstd
            shift = bias - mean * scale
            y = torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
            if relu:
                y.clamp_min_(0)
            y.mul_(mask.to(x.dtype))
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                unbiased = var * n / (n - 1).clamp(min=1)
                running_var.lerp_(unbiased.to(running_var.dtype), momentum)
        ctx.sync = sync
        ctx.save_for_backward(x, mask, weight, mean, invstd, count, y if relu else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mask, weight, mean, invstd, count, y = ctx.saved_tensors
        acc = mask.dtype
        with torch.autocast(x.device.type, enabled=False):
            m = mask[:, 0]
            blocks = _blocks(x.size(0), x.size(1))

            def grad_block(i: int, j: int) -> torch.Tensor:
                if y is None:
                    return dy[i:j].to(acc)
                return torch.ops.aten.threshold_backward(dy[i:j], y[i:j], 0).to(acc)

            grad_bias = weight.new_zeros(x.size(1), dtype=acc)
            grad_xy = torch.zeros_like(grad_bias)  # sums over valid rows
            for i, j in blocks:
                g = grad_block(i, j)
                grad_bias.addmv_(g.t(), m[i:j])
                grad_xy.addmv_((g * x[i:j]).t(), m[i:j])
            grad_weight = invstd * (grad_xy - mean * grad_bias)
            if ctx.sync:  # the input gradient needs the sums of every rank
                sums = torch.cat([grad_bias, grad_weight])
                torch.distributed.all_reduce(sums)
                total_bias, total_weight = sums.split(grad_bias.numel())
            else:
                total_bias, total_weight = grad_bias, grad_weight
            # dx = w invstd (g - (sum g + xhat sum g xhat) / n) on valid rows, 0 else
            a = weight * invstd
            b = -a * invstd * total_weight / count
            c = a * (invstd * mean * total_weight - total_bias) / count
            dx = torch.empty_like(x, dtype=acc)
            for i, j in blocks:
                out = torch.addcmul(c, x[i:j], b, out=dx[i:j])
                out.addcmul_(grad_block(i, j), a).mul_(mask[i:j])
            dx = dx.to(x.dtype)
        return dx, None, grad_weight, grad_bias, None, None, None, None, None, None


class MaskedBatchNorm(torch.nn.BatchNorm1d):
    r"""BatchNorm whose training statistics ignore padded frames.

    The state_dict is that of :class:`torch.nn.BatchNorm1d` (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so it folds with
    ``torch.nn.utils.fusion`` and averages/packs like any ESPnet checkpoint.
    Statistics accumulate in float32 whatever the input dtype (AMP-safe), and a
    training forward never synchronizes the device with the host.

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
        momentum: Optional[float] = 0.1,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.channel_dim = channel_dim
        self.sync = sync

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channel_dim={self.channel_dim}"

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor], relu: bool = False
    ) -> torch.Tensor:
        """Normalize ``x``, then optionally apply ReLU.

        Args:
            x: ``(B, T, C)``, ``(B, C, T)`` or ``(B, C, T, F)`` (see ``channel_dim``).
            mask: bool, True on valid frames, broadcastable to ``x`` with size 1 in
                the channel dim, e.g. ``(B, T, 1)``, ``(B, 1, T)`` or
                ``(B, 1, T, 1)``; ``None``: all valid.
            relu: apply ReLU to the output (fused with the normalization).

        Returns:
            Tensor shaped like ``x``; padded frames are 0 in training.
        """
        channel_dim = self.channel_dim % x.dim()
        if not self.training:
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            y = torch.addcmul(shift.view(shape), x, scale.view(shape))
            return y.relu_() if relu else y

        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative moving average, as torch's BatchNorm
            momentum = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        sync = self.sync if self.sync is not None else _distributed_world_size() > 1
        xt = x.movedim(channel_dim, -1)  # (..., C): a view for channels-last memory
        rows = xt.reshape(-1, xt.size(-1))  # (N, C)
        acc = torch.promote_types(x.dtype, torch.float32)
        if mask is None:
            mask_rows = rows.new_ones(rows.size(0), 1, dtype=acc)
        else:
            mask = mask.movedim(channel_dim, -1)
            mask_rows = mask.expand(*xt.shape[:-1], 1).reshape(-1, 1).to(acc)
        y = _MaskedBatchNormFunction.apply(
            rows,
            mask_rows,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            momentum,
            self.eps,
            relu,
            sync,
        )
        return y.view(xt.shape).movedim(-1, channel_dim)


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
