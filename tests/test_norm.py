"""MaskedBatchNorm: masked statistics, and their reduction across ranks."""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from espnet_fusionformer import norm
from espnet_fusionformer.norm import MaskedBatchNorm

C, T = 6, 9
LENGTHS = [9, 4, 7, 2]  # rank 0 takes the first two utterances, rank 1 the rest


def inputs():
    gen = torch.Generator().manual_seed(0)
    xs = 2 * torch.randn(len(LENGTHS), T, C, generator=gen) + 1
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).unsqueeze(-1)
    probe = torch.randn(len(LENGTHS), T, C, generator=gen)
    return xs, mask, probe


def run(bn, xs, mask, probe):
    """One training step; returns output, input grad, weight grad, running stats."""
    xs = xs.clone().requires_grad_(True)
    ys = bn(xs, mask)
    (ys * probe * mask).sum().backward()
    return ys.detach(), xs.grad, bn.weight.grad, bn.running_mean, bn.running_var


def test_statistics_are_those_of_valid_frames():
    xs, mask, _ = inputs()
    bn = MaskedBatchNorm(C, momentum=1.0)
    ys = bn(xs, mask)
    valid = xs[mask.expand_as(xs)].view(-1, C)
    assert torch.allclose(bn.running_mean, valid.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, valid.var(0, unbiased=True), atol=1e-5)
    normed = ys[mask.expand_as(ys)].view(-1, C)
    assert torch.allclose(normed.mean(0), torch.zeros(C), atol=1e-5)
    # eval mode: an affine map with the running statistics
    bn.eval()
    expected = (xs - valid.mean(0)) / torch.sqrt(valid.var(0) + bn.eps)
    assert torch.allclose(bn(xs, mask), expected, atol=1e-5)


def test_channel_first_layout_matches_channel_last():
    xs, mask, _ = inputs()
    last, first = MaskedBatchNorm(C), MaskedBatchNorm(C, channel_dim=1)
    ys = first(xs.transpose(1, 2), mask.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(last(xs, mask), ys, atol=1e-6)
    assert torch.allclose(last.running_var, first.running_var)


def test_a_single_valid_frame_gives_finite_output_and_statistics():
    bn = MaskedBatchNorm(C)
    mask = torch.zeros(2, T, 1, dtype=torch.bool)
    mask[0, 0] = True
    ys = bn(torch.randn(2, T, C), mask)
    assert torch.isfinite(ys).all() and torch.isfinite(bn.running_var).all()
    assert torch.allclose(ys[0, 0], bn.bias.detach(), atol=1e-4)  # x - mean = 0
    assert not ys[~mask.expand_as(ys)].any()


@pytest.mark.parametrize("relu", [False, True])
def test_gradients_match_finite_differences(monkeypatch, relu):
    monkeypatch.setattr(norm, "_BLOCK", 2 * C)  # several blocks of rows
    xs, mask, _ = inputs()
    xs = xs.double().requires_grad_(True)
    bn = MaskedBatchNorm(C).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)

    def f(x, weight, bias):
        params = {"weight": weight, "bias": bias}
        return torch.func.functional_call(bn, params, (x, mask, relu))

    weight = bn.weight.detach().clone().requires_grad_(True)
    bias = bn.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xs, weight, bias))


def test_relu_is_fused_after_the_normalization():
    xs, mask, probe = inputs()
    plain, fused = MaskedBatchNorm(C), MaskedBatchNorm(C)
    xa, xb = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
    ya, yb = plain(xa, mask).relu(), fused(xb, mask, relu=True)
    (ya * probe).sum().backward()
    (yb * probe).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-6) and torch.allclose(xa.grad, xb.grad)
    assert torch.allclose(plain.weight.grad, fused.weight.grad, atol=1e-5)
    fused.eval()
    assert (fused(xs, mask, relu=True) >= 0).all()


def test_half_precision_counts_do_not_overflow():
    # 70,000 valid frames: beyond float16's range (65,504) as a count
    bn = MaskedBatchNorm(C, channel_dim=1, momentum=1.0)
    xs = (
        (torch.randn(8, C, 125, 80) + 2)
        .half()
        .contiguous(memory_format=torch.channels_last)
    )
    mask = torch.arange(125)[None, :] < torch.tensor([125] * 7 + [25])[:, None]
    ys = bn(xs, mask[:, None, :, None])
    assert ys.dtype == torch.float16 and torch.isfinite(ys).all()
    valid = xs.float().permute(0, 2, 3, 1)[mask].reshape(-1, C)
    assert torch.allclose(bn.running_mean, valid.mean(0), atol=1e-3)
    assert torch.allclose(bn.running_var, valid.var(0), atol=1e-2)


def test_momentum_none_is_a_cumulative_average():
    xs, mask, _ = inputs()
    bn = MaskedBatchNorm(C, momentum=None)
    bn(xs, mask)
    bn(xs * 3, mask)
    valid = xs[mask.expand_as(xs)].view(-1, C)
    assert torch.allclose(bn.running_mean, 2 * valid.mean(0), atol=1e-5)


def _worker(rank: int, world: int, init_file: str, out: str, momentum) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    bn = MaskedBatchNorm(C, momentum=momentum)  # sync=None: on, world size 2
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    xs, mask, probe = inputs()
    part = slice(2 * rank, 2 * rank + 2)
    run(bn, 3 * xs[part], mask[part], probe[part])  # a first step
    torch.save(run(bn, xs[part], mask[part], probe[part]), f"{out}.{rank}")
    dist.barrier()  # neither rank closes its gloo pairs while the other still uses them
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, momentum):
    args = (2, str(tmp_path / "init"), str(tmp_path / "out"), momentum)
    workers = mp.spawn(_worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 180
    while not workers.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            # gloo's teardown hung once (torch 2.6) after both ranks had saved
            for process in workers.processes:
                process.kill()
            break
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]

    torch.manual_seed(0)
    bn = MaskedBatchNorm(C, sync=False, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    xs, mask, probe = inputs()
    run(bn, 3 * xs, mask, probe)
    ys, xgrad, wgrad, mean, var = run(bn, xs, mask, probe)

    assert torch.allclose(torch.cat([r[0] for r in ranks]), ys, atol=1e-5)
    assert torch.allclose(torch.cat([r[1] for r in ranks]), xgrad, atol=1e-5)
    # DDP sums (averages) the per-rank parameter gradients
    assert torch.allclose(ranks[0][2] + ranks[1][2], wgrad, atol=1e-5)
    for r in ranks:
        assert torch.allclose(r[3], mean, atol=1e-6)
        assert torch.allclose(r[4], var, atol=1e-5)
    # and without the reduction the ranks would disagree with the whole batch
    local = MaskedBatchNorm(C, sync=False, momentum=momentum)
    local(3 * xs[:2], mask[:2])
    local(xs[:2], mask[:2])
    assert not torch.allclose(local.running_mean, mean, atol=1e-3)
