"""Streaming: chunk masks, chunk-by-chunk encoding with caches, bad streaming input."""

import pytest
import torch
from conftest import FEATS, batch, make_encoder, warm_up

from espnet_fusionformer import fuse
from espnet_fusionformer.streaming import (
    chunk_mask,
    encode_chunk_by_chunk,
    sample_chunk,
)


def streaming_encoder(**conf):
    encoder = warm_up(make_encoder(causal=True, **conf))
    encoder.fuse_for_inference = False
    return encoder


def test_chunk_mask():
    allowed = chunk_mask(6, 2, left_chunks=1, device=torch.device("cpu"))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert chunk_mask(5, 2, -1, torch.device("cpu"))[4].all()


def test_dynamic_chunks_mix_full_context_and_small_chunks():
    draws = [sample_chunk(100, 25, 4, dynamic_left=True) for _ in range(400)]
    chunks = [c for c, _ in draws if c > 0]
    assert 0.3 < 1 - len(chunks) / len(draws) < 0.7  # about half full context
    assert min(chunks) >= 1 and max(chunks) <= 25 and len(set(chunks)) > 10
    assert {left for c, left in draws if c > 0} <= set(range(5))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("chunk_size,left_chunks", [(1, -1), (4, 0), (4, 2), (16, -1)])
@pytest.mark.parametrize("frames", [57, 150])
def test_chunk_by_chunk_equals_full_forward_under_the_chunk_mask(
    fused, chunk_size, left_chunks, frames
):
    encoder = streaming_encoder(chunk_size=chunk_size, left_chunks=left_chunks)
    if fused:
        encoder = fuse(encoder)
    xs, ilens = batch([frames], seed=5)
    with torch.no_grad():
        full, olens, _ = encoder(xs, ilens)
        streamed = encode_chunk_by_chunk(encoder, xs, chunk_size, left_chunks)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() < 1e-4


def test_chunks_do_not_see_the_future():
    encoder = streaming_encoder(chunk_size=4)
    xs, ilens = batch([120], seed=6)
    later = xs.clone()
    later[:, 60:] = torch.randn(1, 60, FEATS)  # frames from output frame ~14 on
    with torch.no_grad():
        a = encoder(xs, ilens)[0]
        b = encoder(later, ilens)[0]
    first_touched = (60 - 7) // 4 + 1  # first output frame reading input frame 60
    settled = first_touched // 4 * 4  # chunks before it cannot see it
    assert torch.equal(a[:, :settled], b[:, :settled])
    assert not torch.allclose(a[:, first_touched:], b[:, first_touched:])


def test_full_context_model_is_unchanged_by_streaming_options():
    """Dynamic chunk training changes training batches only where it draws a
    chunk; full-context draws and eval (chunk_size 0) equal the plain model."""
    import random

    conf = dict(causal=True, dropout_rate=0.0, positional_dropout_rate=0.0)
    plain, dynamic = warm_up(make_encoder(**conf)), warm_up(make_encoder(**conf))
    dynamic.dynamic_chunk_training = True
    xs, ilens = batch([80, 50])
    with torch.no_grad():
        assert torch.equal(plain(xs, ilens)[0], dynamic(xs, ilens)[0])
    plain.train(), dynamic.train()
    frames = plain(xs, ilens)[0].size(1)
    seen = set()
    for seed in range(12):
        random.seed(seed)
        chunk, _ = sample_chunk(frames, dynamic.max_dynamic_chunk, 1, False)
        random.seed(seed)
        ys = dynamic(xs, ilens)[0]
        same = torch.allclose(ys, plain(xs, ilens)[0], atol=1e-5)
        assert same == (chunk == 0)
        seen.add(chunk == 0)
    assert seen == {True, False}  # both kinds of batches were drawn


def test_bad_streaming_input_is_rejected():
    encoder = streaming_encoder(chunk_size=4)
    xs, _ = batch([40])
    empty = torch.zeros(0, 0, 0, 0)
    ys, att, cnn = encoder.forward_chunk(xs[:, :19], 0, -1, empty, empty)
    assert att.shape == (2, 4, 4, 16) and cnn.shape == (2, 1, 6, 32)
    with pytest.raises(ValueError, match="feature size 21"):
        encoder.forward_chunk(torch.randn(1, 19, FEATS + 1), 4, -1, att, cnn)
    with pytest.raises(ValueError, match="one utterance"):
        encoder.forward_chunk(torch.randn(2, 19, FEATS), 4, -1, att, cnn)
    with pytest.raises(ValueError, match="offset 7 does not match"):
        encoder.forward_chunk(xs[:, 16:35], 7, -1, att, cnn)
    other = streaming_encoder(attention_heads=2, cnn_module_kernel=5)
    _, other_att, other_cnn = other.forward_chunk(xs[:, :19], 0, -1, empty, empty)
    with pytest.raises(ValueError, match="att_cache of shape .* not from this model"):
        encoder.forward_chunk(xs[:, 16:35], 4, -1, other_att, cnn)
    with pytest.raises(ValueError, match="cnn_cache of shape .* not from this model"):
        encoder.forward_chunk(xs[:, 16:35], 4, -1, att, other_cnn)
    with pytest.raises(ValueError, match="causal convolution"):
        warm_up(make_encoder()).forward_chunk(xs[:, :19], 0, -1, empty, empty)
    with pytest.raises(RuntimeError, match="call encoder.eval"):
        encoder.train().forward_chunk(xs[:, :19], 0, -1, empty, empty)


def test_fused_copy_follows_chunk_settings_changed_in_eval():
    encoder = warm_up(make_encoder(causal=True))  # fuse_for_inference: True
    xs, ilens = batch([120], seed=7)
    with torch.no_grad():
        full = encoder(xs, ilens)[0]
        encoder.chunk_size = 4
        chunked = encoder(xs, ilens)[0]
        expected = encode_chunk_by_chunk(encoder, xs, 4)
    assert not torch.allclose(full, chunked, atol=1e-3)
    assert (chunked - expected).abs().max() < 1e-4
