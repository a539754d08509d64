"""Streaming recognition: incremental features, chunked encoder, partial and final
hypotheses, the CLI, and what cannot stream."""

import itertools
import math
import types

import numpy as np
import pytest
import soundfile
import torch
import yaml
from conftest import FEATS, asr_config, warm_up
from espnet2.bin.asr_inference import Speech2Text
from espnet2.tasks.asr import ASRTask

from espnet_fusionformer.stream_decode import (
    Speech2TextStreaming,
    StreamingFrontend,
    ctc_greedy,
    ctc_prefix_beam_search,
    main,
)

CHUNK = 4


def parse(tmp_path, config):
    path = tmp_path / "config_in.yaml"
    path.write_text(yaml.safe_dump(config))
    return ASRTask.get_parser().parse_args(["--config", str(path)])


def streaming_config(tmp_path, **encoder_conf):
    config = asr_config(**{"causal": True, "chunk_size": CHUNK, **encoder_conf})
    stats = tmp_path / "feats_stats.npz"
    rng = np.random.default_rng(0)
    mean, std = rng.uniform(-12, -4, FEATS), rng.uniform(1.5, 3.0, FEATS)
    count = 1000
    np.savez(
        stats,
        count=np.array(count),
        sum=mean * count,
        sum_square=(std**2 + mean**2) * count,
    )
    config.update(normalize="global_mvn", normalize_conf=dict(stats_file=str(stats)))
    return config


def audio(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * (220 + 300 * t) * t) * (1 + np.sin(7 * t))
    return (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny causal FusionFormer ASR model (global_mvn) saved as ESPnet saves
    one, with non-trivial BatchNorms and a sharp CTC layer (varied greedy paths)."""
    tmp = tmp_path_factory.mktemp("stream_model")
    # the weights the greedy paths below were chosen on (FusionFormer's default
    # bn_init_scale halves them; streaming does not depend on it)
    args = parse(tmp, streaming_config(tmp, bn_init_scale=1.0))
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    # without dropout: the greedy paths checked below are the same on every torch
    warm_up(model.encoder, dropout=False)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        weight = model.ctc.ctc_lo.weight
        weight.copy_(torch.randn(weight.shape, generator=gen))
    torch.save(model.state_dict(), tmp / "model.pth")
    (tmp / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    return tmp


@pytest.fixture(scope="module")
def s2t(model_dir):
    return Speech2Text(
        asr_train_config=model_dir / "config.yaml",
        asr_model_file=model_dir / "model.pth",
        beam_size=3,
        ctc_weight=0.3,
    )


def stream(recognizer, speech, block):
    """Feed ``speech`` in blocks; the partial results and the final result."""
    partials = []
    starts = list(range(0, len(speech), block))
    for start in starts:
        final = start == starts[-1]
        results = recognizer(speech[start : start + block], is_final=final)
        if final:
            return partials, results
        if results:
            partials.append(results[0][2])
    raise AssertionError("unreachable")


def full_forward(model, speech, chunk_size, left_chunks):
    """The whole utterance through ``model.encode`` under the chunk mask."""
    encoder = model.encoder
    saved = encoder.chunk_size, encoder.left_chunks
    encoder.chunk_size, encoder.left_chunks = chunk_size, left_chunks
    encoder.eval()  # rebuild the fused copy with this chunk
    try:
        with torch.no_grad():
            x = torch.from_numpy(speech)[None]
            enc, _ = model.encode(x, torch.tensor([x.size(1)]))
    finally:
        encoder.chunk_size, encoder.left_chunks = saved
        encoder.eval()
    return enc[0]


@pytest.mark.parametrize("blocks", [[1, 63, 129, 500], [128], [2000], [10**6]])
def test_incremental_features_equal_full_utterance_features(s2t, blocks):
    model = s2t.asr_model
    frontend = StreamingFrontend(model.frontend)
    for n in (20480, 20800, 20857, 129):  # whole hops, ragged ends, barely a frame
        speech = torch.from_numpy(audio(n / 16000, seed=1))[:n]
        with torch.no_grad():
            full, lens = model.frontend(speech[None], torch.tensor([n]))
        for empty_final in (False, True):  # the end comes with samples or alone
            frontend.reset()
            pieces, start = [], 0
            for size in itertools.cycle(blocks):
                end = min(start + size, n)
                final = end == n and not empty_final
                pieces.append(frontend(speech[start:end], is_final=final))
                start = end
                if end == n:
                    break
            if empty_final:
                pieces.append(frontend(speech[:0], is_final=True))
            streamed = torch.cat(pieces)
            assert streamed.shape == full[0].shape and int(lens) == streamed.size(0)
            assert (streamed - full[0]).abs().max() < 1e-4


@pytest.mark.parametrize("left_chunks", [-1, 1])
def test_streaming_encoder_equals_full_forward_under_the_chunk_mask(s2t, left_chunks):
    recognizer = Speech2TextStreaming(
        speech2text=s2t, chunk_size=CHUNK, left_chunks=left_chunks
    )
    speech = audio(1.37, seed=2)
    partials, _ = stream(recognizer, speech, 1000)
    streamed = recognizer.last_encoder_output
    full = full_forward(s2t.asr_model, speech, CHUNK, left_chunks)
    assert streamed.shape == full.shape
    assert (streamed - full).abs().max() < 1e-4
    # one partial per chunk encoded before the end (chunks can share a block)
    assert 0 < len(partials) <= math.ceil(full.size(0) / CHUNK)


def test_block_sizes_give_the_same_hypotheses_and_ctc_greedy_of_full_forward(s2t):
    recognizer = Speech2TextStreaming(speech2text=s2t, chunk_size=CHUNK)
    model = s2t.asr_model
    speech = audio(1.6, seed=4)
    finals = {}
    for block in (160, 1600, 7777, len(speech)):
        partials, final = stream(recognizer, speech, block)
        finals[block] = final[0]
        for a, b in zip(partials, partials[1:]):  # greedy partials only grow
            assert b[: len(a)] == a
    ids = {block: result[2] for block, result in finals.items()}
    assert len(set(map(tuple, ids.values()))) == 1, ids
    full = full_forward(model, speech, CHUNK, -1)
    expected, _ = ctc_greedy(
        model.ctc.argmax(full[None])[0].tolist(), -1, model.blank_id
    )
    expected = [i for i in expected if i not in (model.sos, model.eos)]
    text, tokens, token_ids, hyp = finals[160]
    assert token_ids == expected and len(expected) > 3
    assert tokens == s2t.converter.ids2tokens(expected)
    assert text == s2t.tokenizer.tokens2text(tokens)
    assert hyp.yseq.tolist() == [model.sos, *expected, model.eos]


@pytest.mark.parametrize("final_decoding", ["attention_rescoring", "beam_search"])
def test_final_search_with_the_decoder(s2t, final_decoding):
    recognizer = Speech2TextStreaming(
        speech2text=s2t, chunk_size=CHUNK, final_decoding=final_decoding, beam_size=3
    )
    speech = audio(0.9, seed=5)
    _, final = stream(recognizer, speech, 4000)
    text, tokens, token_ids, hyp = final[0]
    assert isinstance(text, str) and tokens == s2t.converter.ids2tokens(token_ids)
    assert all(0 < i < len(s2t.asr_model.token_list) for i in token_ids)
    again = stream(recognizer, speech, 999)[1][0]  # the reset left nothing behind
    assert again[2] == token_ids


def test_ctc_prefix_beam_search_sums_all_alignments():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 3), dim=-1)
    totals = {}
    for path in itertools.product(range(3), repeat=5):
        labels = tuple(ctc_greedy(path, -1, blank=0)[0])
        p = sum(float(logp[t, s]) for t, s in enumerate(path))
        totals[labels] = np.logaddexp(totals.get(labels, -np.inf), p)
    nbest = ctc_prefix_beam_search(logp, beam=100, blank=0)
    assert {p for p, _ in nbest} == set(totals)
    for prefix, score in nbest:
        assert abs(score - totals[prefix]) < 1e-9
    assert nbest[0][1] == pytest.approx(max(totals.values()))


def test_short_and_empty_input(s2t):
    recognizer = Speech2TextStreaming(speech2text=s2t, chunk_size=CHUNK)
    assert recognizer(np.zeros(0, np.float32), is_final=False) == []
    assert recognizer(audio(0.05, seed=6), is_final=False) == []
    final = recognizer(np.zeros(0, np.float32), is_final=True)  # 7 frames: 1 out
    assert len(final) == 1 and recognizer.last_encoder_output.size(0) == 1
    assert recognizer(np.zeros(0, np.float32), is_final=True)[0][2] == []


def test_bad_input_and_models_that_cannot_stream(s2t, tmp_path):
    recognizer = Speech2TextStreaming(speech2text=s2t, chunk_size=CHUNK)
    with pytest.raises(TypeError, match="float samples.*int16"):
        recognizer(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match=r"one channel .* shape \(100, 2\)"):
        recognizer(np.zeros((100, 2), np.float32))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        recognizer([0.0] * 100)
    with pytest.raises(ValueError, match="chunk_size"):
        Speech2TextStreaming(speech2text=s2t, chunk_size=0)

    def wrap(**conf):
        model = ASRTask.build_model(parse(tmp_path, conf))
        return types.SimpleNamespace(
            asr_model=model, converter=None, tokenizer=None, beam_search=None
        )

    base = streaming_config(tmp_path)
    mvn = dict(base, normalize="utterance_mvn")
    mvn.pop("normalize_conf")
    with pytest.raises(ValueError, match="utterance_mvn is not streamable"):
        Speech2TextStreaming(speech2text=wrap(**mvn))
    non_causal = dict(base, encoder_conf=dict(base["encoder_conf"], causal=False))
    with pytest.raises(ValueError, match="not causal.*causal: true"):
        Speech2TextStreaming(speech2text=wrap(**non_causal))
    conformer = dict(asr_config("conformer"), normalize=None)
    with pytest.raises(ValueError, match="needs encoder: fusionformer"):
        Speech2TextStreaming(speech2text=wrap(**conformer))


def test_cli_writes_final_and_partial_hypotheses(s2t, model_dir, tmp_path, capsys):
    lines = []
    for i, seconds in enumerate((1.1, 0.7)):
        path = tmp_path / f"u{i}.wav"
        soundfile.write(path, audio(seconds, seed=10 + i), 16000, subtype="FLOAT")
        lines.append(f"u{i} {path}")
    (tmp_path / "wav.scp").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    main(
        [
            "--asr_train_config",
            str(model_dir / "config.yaml"),
            "--asr_model_file",
            str(model_dir / "model.pth"),
            "--wav_scp",
            str(tmp_path / "wav.scp"),
            "--output_dir",
            str(out),
            "--chunk_size",
            str(CHUNK),
            "--block_samples",
            "1600",
        ]
    )
    text = dict(
        (line.split(" ", 1) + [""])[:2]
        for line in (out / "text").read_text().splitlines()
    )
    assert set(text) == {"u0", "u1"}
    recognizer = Speech2TextStreaming(speech2text=s2t, chunk_size=CHUNK)
    for i, seconds in enumerate((1.1, 0.7)):
        final = stream(recognizer, audio(seconds, seed=10 + i), 1600)[1]
        assert text[f"u{i}"] == final[0][0]
    partial = [
        line.split(" ", 2) for line in (out / "partial").read_text().splitlines()
    ]
    times = [float(p[1]) for p in partial if p[0] == "u0"]
    assert len(times) >= 3 and times == sorted(times) and times[-1] <= 1.1
    assert "wrote" in capsys.readouterr().out
