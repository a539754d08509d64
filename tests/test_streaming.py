"""Streaming: chunk masks, chunk-by-chunk encoding with caches, bad streaming input,
the scripted (TorchScript) forward_chunk."""

import pytest
import torch
from conftest import FEATS, batch, make_encoder, warm_up

from espnet_fusionformer import fuse
from espnet_fusionformer.export import check_stream, export_torchscript_stream
from espnet_fusionformer.script import FixedCacheChunkEncoder, ScriptableChunkEncoder
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


# -- the scripted forward_chunk (TorchScript, WeNet's runtime convention) ----------
SCRIPTED_CONFS = {
    "fusion": {},
    "layernorm-abs-qknorm": dict(
        normalization="layernorm",
        pos_enc_layer_type="abs_pos",
        selfattention_layer_type="selfattn",
        qk_norm=True,
        concat_after=True,
    ),
    "batchnorm-legacy-conv2d6": dict(
        normalization="batchnorm_in_place",
        rel_pos_type="legacy",
        macaron_style=False,
        input_layer="conv2d6",
    ),
    "linear-input-no-cnn": dict(
        input_layer="linear",
        pos_enc_layer_type="scaled_abs_pos",
        selfattention_layer_type="selfattn",
        use_cnn_module=False,
    ),
}


def scripted_round_trip(encoder, path):
    """``torch.jit.script`` of the chunk encoder, saved and loaded back."""
    torch.jit.save(torch.jit.script(ScriptableChunkEncoder(encoder)), str(path))
    return torch.jit.load(str(path))


@pytest.mark.parametrize("conf", list(SCRIPTED_CONFS), ids=list(SCRIPTED_CONFS))
@pytest.mark.parametrize("chunk_size,left_chunks", [(4, 2), (16, -1), (1, -1)])
def test_scripted_forward_chunk_equals_eager_chunk_by_chunk(
    conf, chunk_size, left_chunks, tmp_path
):
    encoder = fuse(streaming_encoder(**SCRIPTED_CONFS[conf]))
    scripted = scripted_round_trip(encoder, tmp_path / "encoder_stream.pt")
    assert isinstance(scripted, torch.jit.ScriptModule)
    rate, context = encoder.embed.rate(), encoder.embed.min_input_length()
    assert scripted.subsampling_rate() == rate
    assert scripted.right_context() == context - 1
    xs, _ = batch([200], seed=8)
    window, stride = (chunk_size - 1) * rate + context, chunk_size * rate
    required = chunk_size * left_chunks if left_chunks >= 0 else -1
    empty = torch.zeros(0, 0, 0, 0)
    att, cnn, ref_att, ref_cnn = empty, empty, empty, empty
    offset, chunks = 0, 0
    for start in range(0, xs.size(1) - context + 1, stride):
        chunk = xs[:, start : start + window]
        with torch.no_grad():
            ref, ref_att, ref_cnn = encoder.forward_chunk(
                chunk, offset, required, ref_att, ref_cnn
            )
        # (gradients on: the deploy module needs no torch.no_grad())
        ys, att, cnn = scripted.forward_chunk(chunk, offset, required, att, cnn)
        assert ys.shape == ref.shape
        assert (ys - ref).abs().max() < 1e-4, f"chunk {chunks}"
        offset += ys.size(1)
        chunks += 1
    assert chunks >= 2
    assert att.shape == ref_att.shape and cnn.shape == ref_cnn.shape
    if required >= 0:
        assert att.size(2) == min(offset, required)
    assert (att - ref_att).abs().max() < 1e-4
    if cnn.numel():
        assert (cnn - ref_cnn).abs().max() < 1e-4
    # the calling module (forward) is forward_chunk too
    with torch.no_grad():
        ys, _, _ = scripted(xs[:, :window], 0, required, empty, empty)
        first, _, _ = encoder.forward_chunk(xs[:, :window], 0, required, empty, empty)
    assert (ys - first).abs().max() < 1e-4


def test_scripted_chunk_encoder_refuses_what_cannot_stream():
    with pytest.raises(ValueError, match="causal convolution"):
        ScriptableChunkEncoder(warm_up(make_encoder()))
    with pytest.raises(ValueError, match="conv1d.*cannot stream"):
        ScriptableChunkEncoder(streaming_encoder(positionwise_layer_type="conv1d"))
    with pytest.raises(ValueError, match="ctc_trim"):
        ScriptableChunkEncoder(streaming_encoder(ctc_trim=True))
    conditioned = make_encoder(
        causal=True, interctc_layer_idx=[1], interctc_use_conditioning=True
    ).eval()  # (warm_up would need a CTC)
    with pytest.raises(ValueError, match="interctc_use_conditioning"):
        ScriptableChunkEncoder(conditioned)
    with pytest.raises(RuntimeError, match="training mode"):
        ScriptableChunkEncoder(make_encoder(causal=True).train())


def test_scripted_forward_chunk_rejects_bad_chunks():
    scripted = torch.jit.script(ScriptableChunkEncoder(streaming_encoder()))
    xs, _ = batch([40])
    empty = torch.zeros(0, 0, 0, 0)
    _, att, cnn = scripted.forward_chunk(xs[:, :19], 0, -1, empty, empty)
    error = torch.jit.Error  # TorchScript re-raises its exceptions as this
    with pytest.raises(error, match="one utterance"):
        scripted.forward_chunk(torch.randn(2, 19, FEATS), 4, -1, att, cnn)
    with pytest.raises(error, match="feature size"):
        scripted.forward_chunk(torch.randn(1, 19, FEATS + 1), 4, -1, att, cnn)
    with pytest.raises(error, match="offset does not match"):
        scripted.forward_chunk(xs[:, 16:35], 7, -1, att, cnn)
    with pytest.raises(error, match="cnn_cache is not from this model"):
        scripted.forward_chunk(xs[:, 16:35], 4, -1, att, cnn[:, :, 1:])


def test_streaming_torchscript_export_is_checked(tmp_path):
    encoder = streaming_encoder(chunk_size=4, left_chunks=1)
    path = export_torchscript_stream(encoder, tmp_path / "encoder_stream.pt")
    loaded = torch.jit.load(str(path))
    fused = fuse(encoder)
    assert check_stream(fused, loaded, 4, 1) < 1e-4
    # the export-time check catches a scripted model that drifts from eager
    with torch.no_grad():
        next(loaded.parameters()).add_(1e-2)
    with pytest.raises(RuntimeError, match="differs from eager forward_chunk"):
        check_stream(fused, loaded, 4, 1)
    with pytest.raises(ValueError, match="causal convolution"):
        export_torchscript_stream(warm_up(make_encoder()), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


# -- fixed-size caches (the ONNX streaming graph) ------------------------------------
@pytest.mark.parametrize(
    "conf,chunk_size,left_chunks",
    [
        ("fusion", 4, 2),
        ("fusion", 1, 3),
        ("layernorm-abs-qknorm", 4, 2),
        ("batchnorm-legacy-conv2d6", 2, 1),
    ],
)
def test_fixed_cache_chunks_equal_eager_forward_chunk(conf, chunk_size, left_chunks):
    """Zero caches of the final size, the empty slots masked: every chunk, the
    first ones (cache not yet full) included, equals the eager ``forward_chunk``."""
    encoder = fuse(streaming_encoder(**SCRIPTED_CONFS[conf]))
    module = FixedCacheChunkEncoder(encoder, chunk_size, left_chunks)
    required = chunk_size * left_chunks
    rate, context = encoder.embed.rate(), encoder.embed.min_input_length()
    xs, _ = batch([150], seed=5)
    stride = chunk_size * rate
    _, offset, att, cnn = module.initial_inputs(xs[:, : module.window])
    assert list(att.shape) == module.shapes()["att_cache"]
    ref_att = ref_cnn = torch.zeros(0, 0, 0, 0)
    chunks = 0
    for start in range(0, xs.size(1) - module.window + 1, stride):
        window = xs[:, start : start + module.window]
        with torch.no_grad():
            ref, ref_att, ref_cnn = encoder.forward_chunk(
                window, int(offset), required, ref_att, ref_cnn
            )
            ys, att, cnn = module(window, offset, att, cnn)
        assert ys.shape == ref.shape
        assert (ys - ref).abs().max() < 1e-4, f"chunk {chunks}"
        filled = ref_att.size(2)
        assert (att[:, :, att.size(2) - filled :] - ref_att).abs().max() < 1e-4
        assert (cnn - ref_cnn).abs().max() < 1e-4
        offset = offset + ys.size(1)
        chunks += 1
    assert chunks > left_chunks + 1  # filling and full caches both checked
    assert context == module.window - (chunk_size - 1) * rate


def test_fixed_cache_chunks_refuse_what_they_cannot_hold():
    encoder = streaming_encoder()
    with pytest.raises(ValueError, match="left_chunks must be >= 1"):
        FixedCacheChunkEncoder(encoder, 4, -1)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        FixedCacheChunkEncoder(encoder, 0, 2)
    with pytest.raises(ValueError, match="use_cnn_module"):
        FixedCacheChunkEncoder(streaming_encoder(use_cnn_module=False), 4, 2)
    with pytest.raises(ValueError, match="causal convolution"):
        FixedCacheChunkEncoder(warm_up(make_encoder()), 4, 2)
