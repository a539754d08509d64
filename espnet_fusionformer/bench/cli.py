"""``fusionformer-bench``: command line, the run in stages, and the output files."""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from espnet_fusionformer.bench.cases import (
    FRAMES_PER_SECOND,
    batch_label,
    build_models,
    latency_inputs,
    model_info,
    seconds_label,
)
from espnet_fusionformer.bench.engines import build_exports, make_engines, short_error
from espnet_fusionformer.bench.timing import finish_row, summarize, time_interleaved

FULL = dict(
    output_size=256,
    attention_heads=4,
    linear_units=2048,
    num_blocks=12,
    cnn_module_kernel=15,
    lengths=[67, 100, 260, 1000, 3000],
    batch_lengths=[600, 520, 460, 400, 340, 300, 260, 200],
    threads=[1],
    repeats=15,
    min_repeats=5,
    budget=10.0,
    warmup=1,
    stream_frames=1000,
    train_batches=4,
    train_threads=2,
    train_batch_bins=None,
)
QUICK = dict(
    output_size=64,
    attention_heads=4,
    linear_units=256,
    num_blocks=2,
    cnn_module_kernel=15,
    lengths=[67, 260],
    batch_lengths=[200, 180, 160, 140, 120, 100, 80, 67],
    threads=[1],
    repeats=3,
    min_repeats=2,
    budget=0.5,
    warmup=1,
    stream_frames=1000,
    train_batches=2,
    train_threads=2,
    train_batch_bins=120000,
)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionformer-bench",
        description="CPU benchmark of FusionFormer against ESPnet's Conformer and "
        "the same code with LayerNorm: eager, TorchScript, ONNX Runtime, ONNX "
        "Runtime int8, streaming and the full ASR model's training step, "
        "interleaved in one process.",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="small models, few repeats (tests)")
    add("--out", default="bench_results", help="output directory")
    add("--repeats", type=int, help="max repeats per setting (15; quick 3)")
    add("--min-repeats", type=int, help="min repeats per setting (5)")
    add("--budget", type=float, help="seconds per setting that set the repeats (10)")
    add("--warmup", type=int, help="warm-up calls per engine and setting (1)")
    add("--threads", type=int, nargs="+", help="torch/ORT threads (default 1)")
    add("--lengths", type=int, nargs="+", help="batch-1 input frames (100 = 1 s)")
    add("--batch-lengths", type=int, nargs="+", help="frames of the mixed batch")
    add(
        "--batch-threads",
        type=int,
        help="threads of the batch throughput and streaming rows (default: the "
        "smallest of --threads)",
    )
    add("--input-size", type=int, default=80, help="feature size (80)")
    add("--output-size", type=int, help="model size (256)")
    add("--attention-heads", type=int, help="heads (4)")
    add("--linear-units", type=int, help="FFN units (2048)")
    add("--num-blocks", type=int, help="blocks (12)")
    add("--cnn-module-kernel", type=int, help="depthwise kernel (15)")
    add("--input-layer", default="conv2d", help="subsampling (conv2d)")
    add("--opset", type=int, default=17, help="ONNX opset (17)")
    add("--no-onnx", action="store_true", help="skip ONNX Runtime (float)")
    add("--no-int8", action="store_true", help="skip ONNX Runtime int8")
    add("--no-torchscript", action="store_true", help="skip TorchScript")
    add("--no-train", action="store_true", help="skip the training step")
    add("--no-profile", action="store_true", help="skip op shares/FLOPs/memory")
    add("--no-streaming", action="store_true", help="skip the streaming rows")
    add("--no-latency", action="store_true", help="skip the inference rows")
    add(
        "--train-only",
        action="store_true",
        help="only the training step (same as --no-latency --no-streaming "
        "--no-profile)",
    )
    add("--stream-frames", type=int, help="frames of the streamed utterance (1000)")
    add(
        "--recipe",
        help="recipe directory with conf/ and, for real batches, dump/ and exp/ "
        "(default: egs2/espeak/asr1 under the current directory or the repository)",
    )
    add(
        "--train-configs",
        nargs=2,
        metavar=("FUSIONFORMER_YAML", "CONFORMER_YAML"),
        help="training config pair (default: the recipe's conf/train_fusionformer"
        ".yaml and conf/train_conformer.yaml; quick: the smoke configs)",
    )
    add(
        "--dump",
        help="training dump dir with wav.scp and text (default: the recipe's "
        "dump/raw/train if it exists, else synthetic batches; quick: synthetic)",
    )
    add("--no-dump", action="store_true", help="synthetic training batches")
    add("--train-batches", type=int, help="distinct training batches (4)")
    add("--train-threads", type=int, help="threads of the training step (2)")
    add(
        "--train-batch-bins",
        type=int,
        help="override the config's batch_bins (default: the config's; quick 120000)",
    )
    add("--seed", type=int, default=0)
    return parser


def resolve(args: argparse.Namespace) -> Dict:
    """Fill unset options from the full (or ``--quick``) defaults."""
    base = QUICK if args.quick else FULL
    conf = {}
    for key, default in base.items():
        value = getattr(args, key, None)
        conf[key] = default if value is None else value
    for key in ("input_size", "input_layer", "opset", "seed", "out", "recipe"):
        conf[key] = getattr(args, key)
    conf["batch_threads"] = args.batch_threads or min(conf["threads"])
    if conf["batch_threads"] not in conf["threads"]:
        conf["threads"] = sorted({*conf["threads"], conf["batch_threads"]})
    conf["quick"] = args.quick
    latency = not (args.no_latency or args.train_only)
    conf["latency"] = latency
    # ONNX Runtime engines: in the inference rows and the streaming rows
    conf["onnx"] = not args.no_onnx
    conf["int8"] = not args.no_int8
    conf["torchscript"] = latency and not args.no_torchscript
    conf["train"] = not args.no_train
    conf["profile"] = latency and not args.no_profile
    conf["streaming"] = not (args.no_streaming or args.train_only)
    conf["train_configs"] = args.train_configs
    conf["dump"] = args.dump
    conf["use_dump"] = not args.no_dump and (not args.quick or args.dump is not None)
    if args.train_only and args.no_train:
        raise SystemExit("--train-only and --no-train exclude each other")
    return conf


# -- machine -----------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def busy_cpu_seconds() -> Optional[float]:
    """CPU seconds all processes of the machine have used since boot (Linux
    ``/proc/stat``: user, nice, system, irq, softirq, steal), or ``None``."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """CPU that other processes used while the benchmark ran: ``stop()`` gives
    their average number of busy cores (``None`` where ``/proc/stat`` is missing)."""

    def __init__(self):
        self.busy, self.own = busy_cpu_seconds(), own_cpu_seconds()
        self.wall = time.monotonic()

    def stop(self) -> Optional[float]:
        busy = busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (own_cpu_seconds() - self.own)
        return round(max(others, 0.0) / max(time.monotonic() - self.wall, 1e-9), 2)


def machine_info() -> Dict:
    info = dict(
        cpu=cpu_model(),
        logical_cpus=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    for name in ("espnet", "onnxruntime", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed
            info[name] = None
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


class Stages:
    """A tqdm bar with a banner per stage (name and elapsed seconds)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True)
        self.errors: List[str] = []
        self.started = time.perf_counter()

    def stage(self, desc: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.bar.set_description(f"[{elapsed:6.0f} s] {desc}")

    def done(self) -> None:
        self.bar.update(1)

    def log(self, message: str) -> None:
        self.errors.append(message)
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def latency_rows(models, artifacts, conf, stages: Stages) -> List[Dict]:
    """Batch-1 rows per length and thread count, then the mixed batch."""
    rows: List[Dict] = []
    single, mixed = latency_inputs(conf)
    for th in conf["threads"]:
        torch.set_num_threads(th)
        kinds = tuple(k for k in ("onnx", "int8") if conf[k])
        engines = make_engines(models, artifacts, th, stages.log, kinds)
        warm = {e.key: 2 for e in engines if e.engine == "torchscript"}
        settings = [(f, single[f], "latency", 1) for f in conf["lengths"]]
        if th == conf["batch_threads"]:
            settings.append((None, mixed, "throughput", len(conf["batch_lengths"])))
        for frames, (xs, ilens), section, batch in settings:
            stages.stage(f"{section} {frames or 'batch'} fr, {th} thr")
            active = [
                e for e in engines if section == "latency" or e.engine != "torchscript"
            ]
            calls = {}
            for e in active:
                args = e.prep(xs, ilens)
                calls[e.key] = lambda e=e, args=args: e(args)
            times = time_interleaved(calls, conf, warm)
            audio_s = float(ilens.sum()) / FRAMES_PER_SECOND
            base = dict(
                section=section,
                label=seconds_label(frames)
                if frames
                else batch_label(conf["batch_lengths"]),
                frames=frames,
                audio_s=audio_s,
                threads=th,
                batch=batch,
            )
            pairs = {}
            for e in active:
                pairs.setdefault((e.engine, e.variant), {})[e.slot] = e.key
            for (engine, variant), slots in pairs.items():
                if variant != "fused":  # the unfused FF beside the fused baselines
                    slots = {**pairs[(engine, "fused")], **slots}
                row = dict(base, engine=engine, variant=variant)
                for slot, key in slots.items():
                    row[slot] = summarize(times[key])
                    if section == "throughput":
                        row[slot]["audio_s_per_s"] = round(
                            audio_s / (row[slot]["median_ms"] / 1000), 2
                        )
                rows.append(finish_row(row))
            stages.done()
        del engines
        gc.collect()
    return rows


def notes(conf: Dict) -> List[str]:
    from espnet_fusionformer.bench.stream import streaming_notes

    text = [
        "ESPnet Conformer = espnet2's ConformerEncoder (rel_pos, rel_selfattn, "
        "swish, macaron, normalize_before, use_flash_attn=False). Same code, "
        "LayerNorm = FusionFormerEncoder(normalization='layernorm'): pre-LN, "
        "Swish, GLU, with this package's kernels (merged q/k/v, cached positions, "
        "channels-last convolutions, strided rel_shift), fused like FusionFormer "
        "(its depthwise-conv BatchNorm folded). FusionFormer = "
        "FusionFormerEncoder(normalization='fusion') fused with fuse(); 'FF "
        "unfused' is its training form in eval mode (fuse_for_inference=False). "
        "BatchNorm statistics from 2 training-mode passes on random features.",
        "TorchScript and ONNX: every encoder wrapped the same way ((feats, "
        "feats_lengths) -> (encoded, encoded_lengths); ESPnet's through forward, "
        "this package's through encode), traced on a padded batch of 2 and checked "
        "against eager on other lengths and batch sizes. ONNX: torch.onnx.export "
        f"opset {conf['opset']}, dynamic batch/time. ORT: CPUExecutionProvider, "
        "intra-op threads = threads, inter-op 1, sequential, all graph "
        "optimizations. The twins' float files compute the subsampling's first "
        "two convs as one matmul per tap (subsampling.two_convs_by_taps).",
        "int8: each encoder exported in the int8 form (the twins' subsampling "
        "convs as im2col + one MatMul each; quantize.export_int8) and quantized "
        "the same way with ONNX Runtime's quantize_dynamic (int8 weights, "
        "per-tensor; activations quantized per call; MatMul with a constant "
        "weight of >= 16 input features, every Gemm first rewritten as MatMul + "
        "Add; the inputs of the subsampling's MatMuls quantized once, before their "
        "im2col slices; ESPnet's Conv subsampling is not a MatMul and stays "
        "float), run like the float ONNX rows (espnet_fusionformer.quantize).",
        "Training step: the full ESPnet ASR model (frontend, SpecAugment, "
        "normalize, encoder, decoder, CTC) built by ASRTask.build_model from the "
        "recipe's config pair read at run time (the LayerNorm twin = the "
        "FusionFormer config + encoder_conf normalization=layernorm), forward + "
        "backward + grad clipping + optimizer and scheduler step as ESPnet's "
        "Trainer; the three models interleaved on the same batches.",
        "Targets (1 thread, fused, FusionFormer / baseline): eager ≤ 0.85 vs "
        "ESPnet at 10 s and 2.6 s, ≤ 0.82 on the 67-frame chunk; ONNX Runtime ≤ "
        "0.90 vs ESPnet at the same lengths; int8 ≤ 0.70 vs ESPnet and ≤ 0.90 vs "
        "the same-code LayerNorm at 10 s and 2.6 s; training step ≤ 1.10 vs the "
        "Conformer config.",
        "Absolute times move with the load of other processes; all engines of a "
        "setting are interleaved in every repeat: compare ratios within a run.",
    ]
    if conf["streaming"]:
        text += streaming_notes(conf)
    return text


def run(conf: Dict, stages: Stages) -> Dict:
    """Every stage the options ask for; returns the result dict."""
    started = time.perf_counter()
    machine = machine_info()
    other_load = OtherLoad()
    old_threads = torch.get_num_threads()
    rows: List[Dict] = []
    result: Dict = dict(exports={}, streaming={}, train={}, static={}, models={})
    workdir = Path(tempfile.mkdtemp(prefix="fusionformer-bench-"))
    try:
        if conf["latency"] or conf["streaming"]:
            stages.stage("building models")
            models = build_models(conf)
            result["models"] = model_info(models, conf)
            stages.done()
        if conf["latency"]:
            stages.stage("exporting (TorchScript, ONNX, int8)")
            torch.set_num_threads(max(conf["threads"]))
            result["exports"], artifacts = build_exports(
                models, conf, workdir, stages.log
            )
            stages.done()
            rows += latency_rows(models, artifacts, conf, stages)
        if conf["streaming"]:
            from espnet_fusionformer.bench.stream import run_streaming

            th = conf["batch_threads"]
            torch.set_num_threads(th)
            stages.stage(f"streaming {conf['stream_frames']} fr, {th} thr")
            try:
                stream_rows, result["streaming"] = run_streaming(
                    conf, th, stages.log, workdir
                )
                rows += stream_rows
            except Exception as err:
                stages.log(f"streaming benchmark failed: {short_error(err)}")
                traceback.print_exc()
            stages.done()
        if conf["train"]:
            from espnet_fusionformer.bench.train import run_train

            stages.stage(f"training step, {conf['train_threads']} thr")
            try:
                train_rows, result["train"] = run_train(conf, stages.log)
                rows += train_rows
            except Exception as err:
                stages.log(f"training step failed: {short_error(err)}")
                traceback.print_exc()
            stages.done()
        if conf["profile"]:
            from espnet_fusionformer.bench.profile import profile_all

            stages.stage("profiling")
            result["static"] = profile_all(models, conf, stages.log)
            stages.done()
    finally:
        torch.set_num_threads(old_threads)
        for path in workdir.glob("*"):
            path.unlink()
        workdir.rmdir()
    with contextlib.suppress(OSError):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["other_busy_cores"] = other_load.stop()
    if not result["models"]:
        result["models"] = dict(
            d_model=None, heads=None, blocks=None, units=None, kernel=None,
            input_size=conf["input_size"], input_layer=None, params={},
        )  # fmt: skip
    result.update(
        machine=machine,
        config={k: v for k, v in conf.items() if k != "out"},
        rows=rows,
        targets=[
            dict(label=r["label"], engine=r["engine"], frames=r["frames"], **t)
            for r in rows
            for t in r.get("targets", [])
        ],
        errors=stages.errors,
        notes=notes(conf),
        wall_time_s=round(time.perf_counter() - started, 1),
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    from espnet_fusionformer.bench.plot import plot
    from espnet_fusionformer.bench.report import markdown

    args = get_parser().parse_args(argv)
    conf = resolve(args)
    warnings.filterwarnings("ignore")
    total = int(conf["latency"] or conf["streaming"]) + int(conf["latency"]) * (
        1 + len(conf["lengths"]) * len(conf["threads"]) + 1
    )
    total += int(conf["train"]) + int(conf["profile"]) + int(conf["streaming"])
    stages = Stages(total)
    try:
        result = run(conf, stages)
    finally:
        stages.close()
    out = Path(conf["out"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot(result, out / "bench.png")
    except Exception as err:
        result["errors"].append(f"plot failed: {short_error(err)}")
        traceback.print_exc()
    table = markdown(result)
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    print(table)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return result
