"""Streaming speech recognition with a causal FusionFormer ESPnet ASR model.

Raw 16 kHz audio arrives in pieces of any size. :class:`StreamingFrontend` turns
it into the model's own features frame by frame (only frames whose STFT window is
complete, so they equal the full-utterance features), the model's ``normalize``
(``global_mvn``) applies per frame, the encoder runs ``forward_chunk`` with its
attention and convolution caches whenever a chunk's input window is complete, and
CTC greedy search gives a partial hypothesis after every chunk. ``is_final=True``
flushes the last partial chunk and decodes the whole encoder output once more
(CTC greedy, CTC prefix beam search + attention rescoring, or ESPnet's beam
search)::

    s2t = Speech2TextStreaming(asr_train_config="exp/asr/config.yaml",
                               asr_model_file="exp/asr/valid.acc.ave.pth",
                               chunk_size=16, left_chunks=-1)
    for block, last in blocks:                  # np.float32 arrays, 1-D
        results = s2t(block, is_final=last)     # [] until a chunk is encoded
        if results:
            text, tokens, token_ids, hyp = results[0]

Command line (Kaldi-style ``wav.scp`` in, ``text`` and ``partial`` out)::

    python -m espnet_fusionformer.stream_decode --asr_train_config config.yaml \\
        --asr_model_file model.pth --wav_scp data/test/wav.scp --output_dir out \\
        --chunk_size 16 --left_chunks -1 --block_samples 1600
"""

import argparse
import copy
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

FINAL_DECODINGS = ("ctc_greedy", "attention_rescoring", "beam_search")
Result = Tuple[Optional[str], List[str], List[int], object]


# -- features ------------------------------------------------------------------------
class StreamingFrontend:
    """Incremental features from an espnet2 ``DefaultFrontend``.

    Keeps the (reflection-padded, for ``center=True``) signal from the first frame
    not yet emitted, and runs a copy of the frontend with ``center=False`` on just
    the segment the new frames cover. A frame is emitted once its whole STFT window
    is in real audio; the frames reading the end's reflection padding follow at
    ``is_final``. So the frames equal those of the frontend on the whole utterance.
    """

    def __init__(self, frontend: torch.nn.Module) -> None:
        from espnet2.asr.frontend.default import DefaultFrontend

        if not isinstance(frontend, DefaultFrontend) or frontend.stft is None:
            raise ValueError(
                "streaming features need espnet2's DefaultFrontend with its STFT "
                f"(frontend: default); this model has {type(frontend).__name__}"
            )
        stft = frontend.stft
        self.n_fft, self.hop = stft.n_fft, stft.hop_length
        self.center = stft.center
        self.pad = self.n_fft // 2 if self.center else 0
        self.frontend = copy.deepcopy(frontend).eval()
        self.frontend.stft.center = False  # we pad ourselves, once
        self.reset()

    def reset(self) -> None:
        self.samples = 0  # samples received
        self.frames = 0  # frames emitted
        self._raw: List[torch.Tensor] = []  # before the left padding is possible
        self._signal: Optional[torch.Tensor] = None  # padded signal from _start on
        self._start = 0  # padded index of _signal[0]

    def num_frames(self, samples: int) -> int:
        """Frames of the frontend on a whole utterance of ``samples`` samples."""
        if self.center:
            return samples // self.hop + 1 if samples > self.pad else 0
        return max((samples - self.n_fft) // self.hop + 1, 0)

    @torch.no_grad()
    def __call__(self, speech: torch.Tensor, is_final: bool) -> torch.Tensor:
        """``(N,)`` new samples -> ``(T_new, F)`` new feature frames."""
        self.samples += speech.numel()
        if self._signal is None:
            self._raw.append(speech)
            have = sum(x.numel() for x in self._raw)
            if have <= self.pad:  # the reflection needs pad + 1 samples
                return self._empty()
            raw = torch.cat(self._raw)
            self._raw = []
            left = raw[1 : self.pad + 1].flip(0) if self.pad else raw[:0]
            self._signal = torch.cat([left, raw])
        else:
            self._signal = torch.cat([self._signal, speech])
        if is_final:
            total = self.num_frames(self.samples)
            if self.pad:
                end = self._signal[-self.pad - 1 : -1].flip(0)
                self._signal = torch.cat([self._signal, end])
        else:  # frames whose window ends inside the real audio
            total = max((self.pad + self.samples - self.n_fft) // self.hop + 1, 0)
        if total <= self.frames:
            return self._empty()
        first = self.frames * self.hop - self._start
        last = (total - 1) * self.hop + self.n_fft - self._start
        segment = self._signal[first:last]
        feats, _ = self.frontend(
            segment[None], torch.tensor([segment.numel()], device=segment.device)
        )
        feats = feats[0, : total - self.frames]
        self.frames = total
        keep_from = total * self.hop  # the next frame's start (padded index)
        if self.pad and not is_final:  # and the pad + 1 samples the end reflects
            keep_from = min(keep_from, self.samples - 1)
        drop = max(keep_from - self._start, 0)
        self._signal = self._signal[drop:]
        self._start += drop
        return feats

    def _empty(self) -> torch.Tensor:
        device = next(self.frontend.buffers(), torch.zeros(0)).device
        return torch.zeros(0, self.frontend.output_size(), device=device)


# -- CTC search ----------------------------------------------------------------------
def ctc_greedy(
    ids: Sequence[int], last: int, blank: int, exclude: Sequence[int] = ()
) -> Tuple[List[int], int]:
    """Collapse repeats and drop blanks (and ``exclude``) of frame argmaxes,
    continuing after a previous frame id ``last`` (``-1`` at the start).

    Returns:
        the new tokens and the last frame id.
    """
    out = []
    for i in ids:
        if i != last and i != blank and i not in exclude:
            out.append(i)
        last = i
    return out, last


def _logadd(*xs: float) -> float:
    top = max(xs)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _add_prefix(beams, prefix, pb=-math.inf, pnb=-math.inf) -> None:
    """Add blank-/non-blank-ending probabilities to ``beams[prefix]``."""
    ob, onb = beams.get(prefix, (-math.inf, -math.inf))
    beams[prefix] = (_logadd(ob, pb), _logadd(onb, pnb))


def ctc_prefix_beam_search(
    logp: torch.Tensor, beam: int, blank: int
) -> List[Tuple[Tuple[int, ...], float]]:
    """CTC prefix beam search over ``(T, V)`` log-probabilities.

    Returns:
        up to ``beam`` (prefix, log-probability) pairs, best first.
    """
    neg = -math.inf
    beams: Dict[Tuple[int, ...], Tuple[float, float]] = {(): (0.0, neg)}
    k = min(beam, logp.size(-1))
    top_lp, top_ids = logp.topk(k, dim=-1)
    for lps, ids in zip(top_lp.tolist(), top_ids.tolist()):
        nxt: Dict[Tuple[int, ...], Tuple[float, float]] = {}
        add = functools.partial(_add_prefix, nxt)
        for lp, s in zip(lps, ids):
            for prefix, (pb, pnb) in beams.items():
                if s == blank:
                    add(prefix, pb=_logadd(pb, pnb) + lp)
                elif prefix and prefix[-1] == s:
                    add(prefix, pnb=pnb + lp)  # repeat: the same token
                    add(prefix + (s,), pnb=pb + lp)  # a new token after a blank
                else:
                    add(prefix + (s,), pnb=_logadd(pb, pnb) + lp)
        ranked = sorted(
            ((p, sc) for p, sc in nxt.items() if _logadd(*sc) > neg),
            key=lambda kv: -_logadd(*kv[1]),
        )
        beams = dict(ranked[:beam])
    return [(p, _logadd(*sc)) for p, sc in beams.items()]


# -- the recognizer ------------------------------------------------------------------
def check_streamable(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` can decode chunk by chunk."""
    from espnet2.layers.global_mvn import GlobalMVN
    from espnet2.layers.utterance_mvn import UtteranceMVN

    from espnet_fusionformer.encoder import FusionFormerEncoder

    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, FusionFormerEncoder):
        raise ValueError(
            "streaming decoding needs encoder: fusionformer, this model has "
            f"{type(encoder).__name__}"
        )
    obstacle = encoder.streaming_obstacle()
    if obstacle is not None:
        raise ValueError(
            f"the encoder cannot stream: {obstacle} (streaming models train "
            "ideally with dynamic_chunk_training: true or a chunk_size)"
        )
    normalize = getattr(model, "normalize", None)
    if isinstance(normalize, UtteranceMVN):
        raise ValueError(
            "normalize: utterance_mvn is not streamable (it needs the mean and "
            "variance of the whole utterance): train with normalize: global_mvn"
        )
    if normalize is not None and not isinstance(normalize, GlobalMVN):
        raise ValueError(
            f"normalize: {type(normalize).__name__} is not supported for streaming "
            "(global_mvn or none are)"
        )
    for name in ("preencoder", "postencoder"):
        if getattr(model, name, None) is not None:
            raise ValueError(f"streaming does not support a {name}")
    if getattr(model, "ctc", None) is None:
        raise ValueError("streaming partial results need the model's CTC")
    StreamingFrontend(model.frontend)  # raises for other frontends


class Speech2TextStreaming:
    """Chunk-by-chunk recognizer around an ESPnet ASR model with a causal
    FusionFormer encoder.

    Args:
        asr_train_config, asr_model_file: the model, as for ESPnet's
            ``Speech2Text`` (ignored when ``speech2text`` is given).
        speech2text: an existing ``espnet2.bin.asr_inference.Speech2Text`` whose
            ``asr_model``, ``converter``, ``tokenizer`` (and, for
            ``final_decoding="beam_search"``, beam search) are reused.
        chunk_size: encoder output frames per chunk (``16`` = 640 ms at
            subsampling 4 and a 10 ms hop).
        left_chunks: chunks of left context the attention keeps; ``-1``: all.
        final_decoding: at ``is_final``: ``ctc_greedy``, ``attention_rescoring``
            (CTC prefix beam search, n-best rescored by the attention decoder
            plus the CTC score), or ``beam_search`` (the ``Speech2Text``'s own
            search over the whole encoder output).
        beam_size: beam of the CTC prefix search (attention rescoring) and of the
            ``Speech2Text`` built here (``beam_search``).
        ctc_weight: weight of the CTC score in attention rescoring and in the
            ``Speech2Text`` built here.
        kwargs: further ``Speech2Text`` arguments (``device``, ``maxlenratio``,
            ``lm_file``, ...), when it is built here.
    """

    def __init__(
        self,
        asr_train_config: Union[Path, str, None] = None,
        asr_model_file: Union[Path, str, None] = None,
        speech2text=None,
        chunk_size: int = 16,
        left_chunks: int = -1,
        final_decoding: str = "ctc_greedy",
        beam_size: int = 10,
        ctc_weight: float = 0.3,
        **kwargs,
    ) -> None:
        if chunk_size < 1 or left_chunks < -1:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be >= 1 and left_chunks "
                f"({left_chunks}) >= -1"
            )
        if final_decoding not in FINAL_DECODINGS:
            raise ValueError(
                f"final_decoding {final_decoding!r}: choose from {FINAL_DECODINGS}"
            )
        if speech2text is None:
            from espnet2.bin.asr_inference import Speech2Text

            speech2text = Speech2Text(
                asr_train_config=asr_train_config,
                asr_model_file=asr_model_file,
                **dict(dict(beam_size=beam_size, ctc_weight=ctc_weight), **kwargs),
            )
        model = speech2text.asr_model
        check_streamable(model)
        if final_decoding == "beam_search" and speech2text.beam_search is None:
            raise ValueError("final_decoding beam_search: Speech2Text has no beam")
        model.eval()
        self.speech2text = speech2text
        self.asr_model = model
        self.encoder = model.encoder
        self.converter = speech2text.converter
        self.tokenizer = speech2text.tokenizer
        self.chunk_size, self.left_chunks = chunk_size, left_chunks
        self.final_decoding = final_decoding
        self.beam_size, self.ctc_weight = beam_size, ctc_weight
        self.device = next(model.parameters()).device
        self.fs = self._sample_rate(model.frontend)
        self.frontend = StreamingFrontend(model.frontend)
        self.rate = self.encoder.embed.rate()
        self.context = self.encoder.embed.min_input_length()
        self.window = (chunk_size - 1) * self.rate + self.context
        self.stride = chunk_size * self.rate
        self.required_cache = chunk_size * left_chunks if left_chunks >= 0 else -1
        self.blank = model.blank_id
        self.exclude = (model.sos, model.eos)
        enc = self.encoder
        if enc.chunk_size == 0 and not enc.dynamic_chunk_training:
            logging.warning(
                "this model was trained with full context (chunk_size 0, no "
                "dynamic_chunk_training): chunk-by-chunk results may be poor"
            )
        self.last_encoder_output: Optional[torch.Tensor] = None
        self.reset()

    @staticmethod
    def _sample_rate(frontend) -> Optional[int]:
        fs = getattr(getattr(frontend, "logmel", None), "mel_options", {}).get("sr")
        return int(fs) if fs else None

    def reset(self) -> None:
        """Forget the current utterance (called after every ``is_final``)."""
        self.frontend.reset()
        device = self.device
        self._feats = torch.zeros(
            0, self.frontend.frontend.output_size(), device=device
        )
        self._feat_start = 0  # utterance frame index of _feats[0]
        self._att_cache = torch.zeros(0, 0, 0, 0, device=device)
        self._cnn_cache = torch.zeros(0, 0, 0, 0, device=device)
        self._offset = 0  # encoder output frames so far
        self._encoded: List[torch.Tensor] = []
        self._logp: List[torch.Tensor] = []
        self._tokens: List[int] = []
        self._last = -1
        self.samples = 0

    # -- input -----------------------------------------------------------------------
    def _as_tensor(self, speech) -> torch.Tensor:
        if isinstance(speech, np.ndarray):
            if not np.issubdtype(speech.dtype, np.floating):
                raise TypeError(
                    f"speech must hold float samples in [-1, 1], got dtype "
                    f"{speech.dtype} (int16 PCM: divide by 32768)"
                )
            speech = torch.from_numpy(np.ascontiguousarray(speech))
        elif isinstance(speech, torch.Tensor):
            if not speech.is_floating_point():
                raise TypeError(
                    f"speech must hold float samples in [-1, 1], got dtype "
                    f"{speech.dtype}"
                )
        else:
            raise TypeError(
                f"speech must be a numpy array or torch tensor, got "
                f"{type(speech).__name__}"
            )
        if speech.dim() != 1:
            raise ValueError(
                f"speech must be one channel of samples (N,), got shape "
                f"{tuple(speech.shape)}"
            )
        if not bool(torch.isfinite(speech).all()):
            raise ValueError("speech contains NaN or Inf")
        return speech.detach().to(self.device, torch.float32)

    # -- decoding --------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, speech, is_final: bool = False) -> List[Result]:
        """Feed the next samples of the utterance.

        Args:
            speech: ``(N,)`` float samples at the model's sample rate (any ``N``,
                also 0).
            is_final: the utterance ends with these samples.

        Returns:
            ``[]`` if no new chunk was encoded, else the partial (or, with
            ``is_final``, the final) results, ESPnet-style
            ``[(text, tokens, token_ids, hyp)]`` (one entry; ``hyp`` an ESPnet
            ``Hypothesis`` whose ``yseq`` is ``[sos, *token_ids, eos]``). After
            ``is_final`` the recognizer is reset for the next utterance.
        """
        speech = self._as_tensor(speech)
        self.samples += speech.numel()
        feats = self.frontend(speech, is_final)
        new = self._encode(self._normalize(feats), is_final)
        if not is_final:
            return self._results(self._tokens, None) if new else []
        try:
            return self._final()
        finally:
            self.reset()

    def _normalize(self, feats: torch.Tensor) -> torch.Tensor:
        normalize = self.asr_model.normalize
        if normalize is None or feats.size(0) == 0:
            return feats
        lengths = torch.tensor([feats.size(0)], device=feats.device)
        out, _ = normalize(feats[None].clone(), lengths)
        return out[0]

    def _encode(self, feats: torch.Tensor, is_final: bool) -> bool:
        """Encode every chunk whose input window is complete; ``True`` if any."""
        self._feats = torch.cat([self._feats, feats])
        encoded = False
        while True:
            start = self._offset // self.chunk_size * self.stride - self._feat_start
            available = self._feats.size(0) - start
            if available >= self.window:
                xs = self._feats[start : start + self.window]
            elif is_final and available >= self.context:
                xs = self._feats[start:]  # the last, partial chunk
            else:
                break
            ys, self._att_cache, self._cnn_cache = self.encoder.forward_chunk(
                xs[None],
                self._offset,
                self.required_cache,
                self._att_cache,
                self._cnn_cache,
                self.asr_model.ctc,  # for interctc_use_conditioning
            )
            self._offset += ys.size(1)
            self._add_output(ys[0])
            encoded = True
            drop = start + self.stride  # the next window starts there
            self._feats = self._feats[drop:]
            self._feat_start += drop
            if ys.size(1) < self.chunk_size:
                break
        return encoded

    def _add_output(self, ys: torch.Tensor) -> None:
        self._encoded.append(ys)
        logp = self.asr_model.ctc.log_softmax(ys[None])[0]
        self._logp.append(logp)
        tokens, self._last = ctc_greedy(
            logp.argmax(-1).tolist(), self._last, self.blank, self.exclude
        )
        self._tokens += tokens

    def encoder_output(self) -> torch.Tensor:
        """``(T', D)`` encoder output of the current utterance so far."""
        if not self._encoded:
            return torch.zeros(0, self.encoder.output_size(), device=self.device)
        return torch.cat(self._encoded)

    def _final(self) -> List[Result]:
        enc = self.encoder_output()
        self.last_encoder_output = enc  # kept after the reset (inspection, tests)
        if self.final_decoding == "ctc_greedy" or enc.size(0) == 0:
            return self._results(self._tokens, None)
        if self.final_decoding == "beam_search":
            return self.speech2text._decode_single_sample(enc)[:1]
        logp = torch.cat(self._logp)
        nbest = ctc_prefix_beam_search(logp, self.beam_size, self.blank)
        tokens, score = attention_rescoring(self.asr_model, enc, nbest, self.ctc_weight)
        return self._results(tokens, score)

    def _results(self, tokens: List[int], score: Optional[float]) -> List[Result]:
        from espnet.nets.beam_search import Hypothesis

        model = self.asr_model
        yseq = torch.tensor([model.sos, *tokens, model.eos], dtype=torch.long)
        hyp = Hypothesis(yseq=yseq, score=0.0 if score is None else score)
        token = self.converter.ids2tokens(tokens)
        text = self.tokenizer.tokens2text(token) if self.tokenizer else None
        return [(text, token, list(tokens), hyp)]


@torch.no_grad()
def attention_rescoring(
    model: torch.nn.Module,
    enc: torch.Tensor,
    nbest: List[Tuple[Tuple[int, ...], float]],
    ctc_weight: float,
) -> Tuple[List[int], float]:
    """Rescore CTC n-best ``[(tokens, ctc_logp)]`` with the attention decoder:
    ``(1 - ctc_weight) * decoder_logp(tokens + eos) + ctc_weight * ctc_logp``.

    Returns:
        the best tokens and their score (the CTC best without a decoder).
    """
    if getattr(model, "decoder", None) is None or ctc_weight >= 1.0:
        tokens, score = max(nbest, key=lambda h: h[1])
        return list(tokens), score
    n = len(nbest)
    longest = max(len(t) for t, _ in nbest) + 1
    ys_in = torch.full((n, longest), model.eos, dtype=torch.long)
    ys_out = torch.full((n, longest), -1, dtype=torch.long)
    for i, (tokens, _) in enumerate(nbest):
        ys_in[i, : len(tokens) + 1] = torch.tensor([model.sos, *tokens])
        ys_out[i, : len(tokens) + 1] = torch.tensor([*tokens, model.eos])
    lens = torch.tensor([len(t) + 1 for t, _ in nbest])
    ys_in, ys_out, lens = (
        ys_in.to(enc.device),
        ys_out.to(enc.device),
        lens.to(enc.device),
    )
    hs = enc[None].expand(n, -1, -1)
    hlens = torch.full((n,), enc.size(0), dtype=torch.long, device=enc.device)
    logits, _ = model.decoder(hs, hlens, ys_in, lens)
    logp = torch.log_softmax(logits, dim=-1)
    valid = ys_out >= 0
    att = logp.gather(-1, ys_out.clamp(min=0)[..., None])[..., 0]
    att = att.masked_fill(~valid, 0.0).sum(-1)
    scores = [
        (1 - ctc_weight) * float(a) + ctc_weight * ctc
        for a, (_, ctc) in zip(att, nbest)
    ]
    best = max(range(n), key=scores.__getitem__)
    return list(nbest[best][0]), scores[best]


# -- command line --------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionformer-stream-decode",
        description="Streaming decoding of a wav.scp with a causal FusionFormer "
        "ESPnet ASR model: audio fed in blocks, partial CTC hypotheses after every "
        "encoder chunk, a final hypothesis per utterance.",
    )
    add = parser.add_argument
    add("--asr_train_config", required=True)
    add("--asr_model_file", required=True)
    add("--wav_scp", required=True, help="Kaldi-style 'utt path' list")
    add("--output_dir", required=True, help="writes text and partial here")
    add("--chunk_size", type=int, default=16, help="encoder frames per chunk")
    add("--left_chunks", type=int, default=-1, help="left context chunks (-1 all)")
    add("--block_samples", type=int, default=1600, help="samples fed per call")
    add(
        "--final_decoding",
        choices=FINAL_DECODINGS,
        default="ctc_greedy",
        help="search at the end of each utterance",
    )
    add("--beam_size", type=int, default=10, help="beam (rescoring, beam search)")
    add("--ctc_weight", type=float, default=0.3, help="CTC weight (same)")
    add("--device", default="cpu")
    add("--nthreads", type=int, default=1, help="torch threads")
    return parser


def _write_line(f, *fields) -> None:
    f.write(" ".join(str(x) for x in fields if x != "") + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_parser().parse_args(argv)
    if args.block_samples < 1:
        raise SystemExit("--block_samples must be >= 1")
    from espnet2.fileio.sound_scp import SoundScpReader
    from tqdm import tqdm

    torch.set_num_threads(args.nthreads)
    try:
        s2t = Speech2TextStreaming(
            asr_train_config=args.asr_train_config,
            asr_model_file=args.asr_model_file,
            chunk_size=args.chunk_size,
            left_chunks=args.left_chunks,
            final_decoding=args.final_decoding,
            beam_size=args.beam_size,
            ctc_weight=args.ctc_weight,
            device=args.device,
        )
    except ValueError as err:  # a model that cannot stream
        raise SystemExit(f"{args.asr_model_file}: {err}") from err
    reader = SoundScpReader(args.wav_scp, dtype="float32")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    block = args.block_samples
    with open(out / "text", "w") as text_f, open(out / "partial", "w") as partial_f:
        for utt in tqdm(list(reader.keys()), desc="stream decode", file=sys.stderr):
            rate, speech = reader[utt]
            if s2t.fs is not None and rate != s2t.fs:
                raise SystemExit(
                    f"{utt}: sample rate {rate} Hz, the model expects {s2t.fs} Hz"
                )
            if speech.ndim != 1:
                speech = speech[:, 0]  # first channel
            n = len(speech)
            starts = list(range(0, n, block)) or [0]
            for start in starts:
                final = start + block >= n
                results = s2t(speech[start : start + block], is_final=final)
                if results and not final:
                    seconds = min(start + block, n) / rate
                    _write_line(partial_f, utt, f"{seconds:.3f}", _text(results))
                if final:
                    _write_line(text_f, utt, _text(results))
    print(f"wrote {out / 'text'} and {out / 'partial'}")


def _text(results: List[Result]) -> str:
    if not results:
        return ""
    text, tokens, _, _ = results[0]
    return text if text is not None else " ".join(tokens)


if __name__ == "__main__":
    main()
