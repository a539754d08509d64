"""Streaming rows: per-chunk latency, real-time factor and first-token latency of
the causal, fused FusionFormer and its LayerNorm twin (``forward_chunk`` through
``streaming.encode_chunk_by_chunk``) against ESPnet's
``ContextualBlockConformerEncoder.forward_infer``, on one utterance."""

import gc
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from espnet_fusionformer.bench.cases import (
    CONFORMER,
    FRAMES_PER_SECOND,
    FUSIONFORMER,
    LAYERNORM,
    MODELS,
    STREAMING,
    parameters,
    streaming_models,
)
from espnet_fusionformer.bench.timing import (
    clock_name,
    finish_row,
    now,
    repeats_for,
    summarize,
)
from espnet_fusionformer.export import OnnxStream
from espnet_fusionformer.streaming import encode_chunk_by_chunk

CBC_CLASS = (
    "espnet2.asr.encoder.contextual_block_conformer_encoder."
    "ContextualBlockConformerEncoder"
)


class TimedChunks:
    """An encoder seen by ``encode_chunk_by_chunk`` whose ``forward_chunk`` calls
    are timed: ``calls`` gets ``(seconds, output frames)`` per call."""

    def __init__(self, encoder: torch.nn.Module):
        self.encoder, self.embed = encoder, encoder.embed
        self.calls: List[Tuple[float, int]] = []

    def forward_chunk(self, *args):
        start = now()
        out = self.encoder.forward_chunk(*args)
        self.calls.append((now() - start, out[0].size(1)))
        return out


def chunk_stream(encoder, xs: torch.Tensor) -> List[Tuple[float, int]]:
    """``(1, T, F)`` chunk by chunk: ``(seconds, output frames)`` per call."""
    timed = TimedChunks(encoder)
    with torch.inference_mode():
        encode_chunk_by_chunk(
            timed, xs, STREAMING["chunk_size"], STREAMING["left_chunks"]
        )
    return timed.calls


class TimedOnnxStream(OnnxStream):
    """``OnnxStream`` whose calls are timed: ``seconds`` gets one entry per window
    (every window returns a whole chunk)."""

    seconds: List[float]

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        start = now()
        out = super().__call__(window)
        self.seconds.append(now() - start)
        return out

    def timed(self, xs: torch.Tensor) -> Tuple[List[float], int]:
        """Encode ``(1, T, F)``: seconds per window and the output frames kept."""
        self.seconds = []
        frames = self.encode(xs).size(1)
        return self.seconds, frames


def onnx_streams(
    models, threads: int, workdir: Path, kinds: Tuple[str, ...], log
) -> Dict[str, Dict[str, TimedOnnxStream]]:
    """``{metric: {encoder: stream}}``: the LayerNorm and FusionFormer twins'
    chunk paths exported with fixed-size caches (``export_onnx_stream``, checked
    against eager) and run in ONNX Runtime, float (``chunk_onnx``) and int8
    (``chunk_int8``, ``quantize.export_int8``). ESPnet's ContextualBlockConformer
    has no ONNX path here, so its column stays empty."""
    from espnet_fusionformer.export import export_onnx_stream, onnx_session
    from espnet_fusionformer.quantize import export_int8

    out: Dict[str, Dict[str, TimedOnnxStream]] = {}
    for name in (LAYERNORM, FUSIONFORMER):
        model = models[name]
        rate, context = model.embed.rate(), model.embed.min_input_length()
        try:

            def export(path, model=model):
                return export_onnx_stream(
                    model, path, STREAMING["chunk_size"], STREAMING["left_chunks"]
                )

            files = {}
            if "onnx" in kinds:
                files["chunk_onnx"] = export(workdir / f"{name}.stream.onnx")
            if "int8" in kinds:  # the int8 form (export_int8)
                int8 = export_int8(export, workdir / f"{name}.stream.int8.onnx")
                files["chunk_int8"] = int8
            for metric, file in files.items():
                session = onnx_session(file, threads)
                out.setdefault(metric, {})[name] = TimedOnnxStream(
                    session, rate, context
                )
        except Exception as err:  # reported, the eager rows stay
            log(f"streaming ONNX of {name} failed: {type(err).__name__}: {err}")
    return out


def chunk_window(encoder) -> int:
    """Input frames of one chunk's window: the first output waits for them."""
    rate, context = encoder.embed.rate(), encoder.embed.min_input_length()
    return (STREAMING["chunk_size"] - 1) * rate + context


def cbc_feed(encoder) -> int:
    """Input frames the ContextualBlockConformer is fed per call: one hop of
    output frames (640 ms at hop 16 and subsampling 4)."""
    return STREAMING["hop_size"] * getattr(encoder, "subsample", 4)


def cbc_stream(encoder, xs: torch.Tensor) -> List[Tuple[float, int]]:
    """Feed ``(1, T, F)`` to ``forward_infer`` in pieces of ``cbc_feed`` frames,
    ``is_final`` on the last: ``(seconds, output frames)`` per call."""
    feed = cbc_feed(encoder)
    states, calls = None, []
    with torch.inference_mode():
        for start in range(0, xs.size(1), feed):
            piece = xs[:, start : start + feed]
            final = start + feed >= xs.size(1)
            t0 = now()
            ys, _, states = encoder.forward_infer(
                piece, torch.tensor([piece.size(1)]), states, is_final=final
            )
            calls.append((now() - t0, ys.size(1)))
    return calls


def cbc_first_output_frames(encoder, xs: torch.Tensor) -> int:
    """Fewest input frames after which ``forward_infer`` (not final) returns
    output: the audio the first encoder output waits for."""
    with torch.inference_mode():
        for frames in range(1, xs.size(1) + 1):
            ys, _, _ = encoder.forward_infer(
                xs[:, :frames], torch.tensor([frames]), None, is_final=False
            )
            if ys.size(1) > 0:
                return frames
    return xs.size(1)


def first_output_fns(models, xs: torch.Tensor) -> Dict[str, Tuple[int, Callable]]:
    """Per encoder: input frames its first output needs, and a call computing
    that first output from a fresh state."""
    out = {}
    for name in (LAYERNORM, FUSIONFORMER):
        model, frames = models[name], chunk_window(models[name])

        def first(model=model, frames=frames):
            with torch.inference_mode():
                return encode_chunk_by_chunk(
                    model,
                    xs[:, :frames],
                    STREAMING["chunk_size"],
                    STREAMING["left_chunks"],
                )

        out[name] = (frames, first)
    cbc = models[CONFORMER]
    cbc_frames = cbc_first_output_frames(cbc, xs)

    def cbc_first():
        with torch.inference_mode():
            return cbc.forward_infer(
                xs[:, :cbc_frames], torch.tensor([cbc_frames]), None, is_final=False
            )

    out[CONFORMER] = (cbc_frames, cbc_first)
    return out


def run_streaming(
    conf: Dict, threads: int, log, workdir: Optional[Path] = None
) -> Tuple[List[Dict], Dict]:
    """Interleaved streaming runs of the three encoders on one utterance; with a
    ``workdir`` and ONNX Runtime, also the twins' ONNX (float, int8) chunk paths."""
    models = streaming_models(conf)
    kinds = tuple(k for k in ("onnx", "int8") if conf.get(k))
    ort_streams = {}
    if workdir is not None and kinds:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            log("streaming ONNX rows skipped: onnxruntime is not installed")
        else:
            ort_streams = onnx_streams(models, threads, workdir, kinds, log)
    frames = conf["stream_frames"]
    audio_s = frames / FRAMES_PER_SECOND
    gen = torch.Generator().manual_seed(conf["seed"] + 3)
    xs = torch.randn(1, frames, conf["input_size"], generator=gen)
    streams = {
        CONFORMER: lambda: cbc_stream(models[CONFORMER], xs),
        LAYERNORM: lambda: chunk_stream(models[LAYERNORM], xs),
        FUSIONFORMER: lambda: chunk_stream(models[FUSIONFORMER], xs),
    }
    firsts = first_output_fns(models, xs)
    estimate = 0.0
    out_frames, n_calls = {}, {}
    for name in MODELS:
        for _ in range(max(conf["warmup"], 1)):
            start = now()
            calls = streams[name]()
            firsts[name][1]()
            last = now() - start
        estimate += last
        out_frames[name] = sum(n for _, n in calls)
        n_calls[name] = len(calls)
    for metric, by_name in ort_streams.items():
        for name, stream in by_name.items():
            for _ in range(max(conf["warmup"], 1)):
                start = now()
                _, frames = stream.timed(xs)
                last = now() - start
            estimate += last
            if frames != out_frames[name]:
                log(f"streaming {metric} {name}: other output frames than eager")
    if len(set(out_frames.values())) > 1:
        log(f"streaming: output frames differ {out_frames}")
    repeats = repeats_for(estimate, conf)
    ort_times: Dict[str, Dict[str, List[float]]] = {
        metric: {name: [] for name in by_name}
        for metric, by_name in ort_streams.items()
    }
    chunk_times: Dict[str, List[float]] = {name: [] for name in MODELS}
    totals: Dict[str, List[float]] = {name: [] for name in MODELS}
    first: Dict[str, List[float]] = {name: [] for name in MODELS}
    order = list(MODELS)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            names = order if r % 2 == 0 else order[::-1]
            for name in names:
                calls = streams[name]()
                chunk_times[name] += [t for t, n in calls if n > 0]
                totals[name].append(sum(t for t, _ in calls))
            for name in names:
                start = now()
                firsts[name][1]()
                compute = now() - start
                first[name].append(firsts[name][0] / FRAMES_PER_SECOND + compute)
            for metric, by_name in ort_streams.items():
                for name in names:
                    if name in by_name:
                        seconds, _ = by_name[name].timed(xs)
                        ort_times[metric][name] += seconds
    finally:
        gc.enable()
    base = dict(
        section="streaming",
        engine="streaming",
        variant="fused",
        frames=frames,
        audio_s=audio_s,
        threads=threads,
        batch=1,
    )
    rows = []
    for metric, label, values in (
        ("chunk", "per-chunk latency (16 fr = 640 ms)", chunk_times),
        ("total", f"{audio_s:g} s stream, total compute", totals),
        ("first_token", "first-token latency (wait + compute)", first),
    ):
        row = dict(base, metric=metric, label=label)
        for name in MODELS:
            stats = summarize(values[name])
            if metric == "total":
                stats["rtf"] = round(stats["median_ms"] / 1000 / audio_s, 4)
            if metric == "first_token":
                stats["wait_ms"] = round(1000 * firsts[name][0] / FRAMES_PER_SECOND, 1)
            row[name] = stats
        rows.append(finish_row(row))
    for metric, times in ort_times.items():
        engine = "ONNX Runtime int8" if metric == "chunk_int8" else "ONNX Runtime"
        row = dict(base, metric=metric, label=f"per-chunk latency, {engine}")
        for name, values in times.items():
            row[name] = summarize(values)
        rows.append(finish_row(row))
    info = dict(threads=threads, audio_s=audio_s, repeats=repeats)
    for name in MODELS:
        info[name] = dict(
            first_output_input_frames=firsts[name][0],
            output_frames=out_frames[name],
            calls=n_calls[name],
            params=parameters(models[name]),
        )
    info[CONFORMER].update(
        cls=CBC_CLASS,
        block_size=STREAMING["block_size"],
        hop_size=STREAMING["hop_size"],
        look_ahead=STREAMING["look_ahead"],
        feed_frames=cbc_feed(models[CONFORMER]),
    )
    for name, norm in ((LAYERNORM, "layernorm"), (FUSIONFORMER, "fusion")):
        info[name].update(
            cls=f"espnet_fusionformer.FusionFormerEncoder (causal, fused, "
            f"normalization={norm})",
            chunk_size=STREAMING["chunk_size"],
            left_chunks=STREAMING["left_chunks"],
        )
    return rows, info


def streaming_notes(conf: Dict) -> List[str]:
    chunk, left = STREAMING["chunk_size"], STREAMING["left_chunks"]
    return [
        f"Streaming (1 utterance of {conf['stream_frames']} frames = "
        f"{conf['stream_frames'] / FRAMES_PER_SECOND:g} s, batch 1, "
        f"{conf['batch_threads']} thread(s), torch.inference_mode, the three "
        "encoders alternating within every repeat): FusionFormer and the "
        "same-code LayerNorm twin = causal FusionFormerEncoder, fused, encoded by "
        "streaming.encode_chunk_by_chunk (forward_chunk with attention and "
        f"convolution caches), chunks of {chunk} output frames ({chunk * 40} ms at "
        f"subsampling 4), {left} chunks of left context; 'ESPnet' in the streaming "
        f"table = {CBC_CLASS} (same sizes, macaron, swish; block_size "
        f"{STREAMING['block_size']}, hop_size {STREAMING['hop_size']}, look_ahead "
        f"{STREAMING['look_ahead']}), forward_infer fed {STREAMING['hop_size'] * 4} "
        "input frames (640 ms) per call, is_final on the last. Encoders only.",
        f"Per-chunk latency: {clock_name(conf['batch_threads'])} of every call "
        "that returned encoder output "
        "(all repeats pooled; median and 90th percentile). Real-time factor: total "
        "compute of the whole stream / audio duration (median over repeats).",
        "First-token latency (encoder only) = the audio the first output waits for "
        "+ the compute of the call that produces it, from a fresh state: one chunk "
        "window ((chunk-1)*4+7 frames) for the chunked encoders; for "
        "ContextualBlockConformer the fewest frames after which forward_infer "
        "returns output (a whole block with its look-ahead).",
        "ONNX Runtime streaming rows: the twins' chunk paths exported with "
        "fixed-size caches (export.export_onnx_stream: the same chunk and left "
        "context, empty cache slots masked, checked against eager forward_chunk), "
        "float and int8 (quantize.export_int8, as the other int8 rows), run by "
        "export.OnnxStream at the same threads, interleaved with the eager streams; "
        "ESPnet's ContextualBlockConformer has no ONNX export here (its column is "
        "n/a).",
    ]
