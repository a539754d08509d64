"""The benchmark's Markdown report: one table row per setting with both baselines
(ESPnet's Conformer and the same code with LayerNorm) beside FusionFormer."""

from typing import Dict, List, Optional

from espnet_fusionformer.bench.cases import (
    CONFORMER,
    FRAMES_PER_SECOND,
    FUSIONFORMER,
    LAYERNORM,
    MODELS,
    NAMES,
    UNFUSED,
)
from espnet_fusionformer.bench.engines import ENGINES


def fmt_stats(s: Optional[Dict]) -> str:
    if not s:
        return "n/a"
    return f"{s['median_ms']:.1f} [{s['p25_ms']:.1f}–{s['p75_ms']:.1f}]"


def fmt_ratio(row: Dict, key: str) -> str:
    """Ratio of medians and, in brackets, the median paired ratio."""
    ratio, paired = row["ratios"].get(key), row["paired"].get(key)
    if ratio is None:
        return "n/a"
    return f"{ratio:.3f}" + (f" ({paired['median']:.3f})" if paired else "")


def row_label(row: Dict) -> str:
    if row["section"] == "latency":
        engine = ENGINES.get(row["engine"], row["engine"])
        variant = ", FF unfused" if row["variant"] == UNFUSED else ""
        return f"{engine}{variant}, {row['label']} ({row['frames']} fr)"
    if row["section"] == "throughput":
        variant = ", FF unfused" if row["variant"] == UNFUSED else ""
        return f"{row['label']}, {ENGINES.get(row['engine'], row['engine'])}{variant}"
    return row["label"]


def target_cell(row: Dict) -> str:
    cells = []
    for t in row.get("targets", []):
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "missed")
        cells.append(f"vs {t['vs']} ≤ {t['target']:.2f}: **{verdict}**")
    return "; ".join(cells)


def share_cell(row: Dict) -> str:
    share = row.get("share")
    if not share:
        return "—"
    return f"{100 * share['architecture']:.0f} / {100 * share['implementation']:.0f}"


def busy_warning(m: Dict) -> str:
    """A warning when other processes competed for the cores: measured as the
    cores they kept busy during the run, else from the 1-min load averages (which
    trail: a load stopped just before the run still shows at its start)."""
    cpus = m.get("logical_cpus") or 1
    noisy = (
        ". **The results are noisy: other processes competed for the cores; "
        "absolute times are meaningless (the paired ratios in brackets are the "
        "more robust ones).**"
    )
    others = m.get("other_busy_cores")
    if others is not None:
        line = f"; other processes kept {others:.2f} of {cpus} cores busy in the run"
        return line + (noisy if others > 0.25 else " (quiet)")
    loads = [x[0] for x in (m.get("loadavg_start"), m.get("loadavg_end")) if x]
    if loads and max(loads) > cpus - 0.5:
        return f"; 1-min load average up to {max(loads):.1f} on {cpus} CPUs" + noisy
    return ""


TABLE_HEAD = [
    f"| setting | threads | batch | {NAMES[CONFORMER]} ms | {NAMES[LAYERNORM]} ms | "
    "FusionFormer ms | FF / ESPnet | FF / LN (architecture) | LN / ESPnet "
    "(implementation) | share arch / impl % | target |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]


def table_line(row: Dict) -> str:
    return (
        f"| {row_label(row)} | {row['threads']} | {row['batch']} | "
        f"{fmt_stats(row.get(CONFORMER))} | {fmt_stats(row.get(LAYERNORM))} | "
        f"{fmt_stats(row.get(FUSIONFORMER))} | {fmt_ratio(row, 'ff_vs_conformer')} | "
        f"{fmt_ratio(row, 'ff_vs_layernorm')} | "
        f"{fmt_ratio(row, 'layernorm_vs_conformer')} | {share_cell(row)} | "
        f"{target_cell(row)} |"
    )


def markdown(result: Dict) -> str:
    m, conf, info = result["machine"], result["config"], result["models"]
    params = info["params"]
    lines = [
        "# FusionFormer vs ESPnet's Conformer and the same code with LayerNorm: "
        "CPU benchmark",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch "
        f"{m['torch']}, onnxruntime {m.get('onnxruntime')}, espnet "
        f"{m.get('espnet')}, Python {m['python']}; {m['date']}",
        f"- Load average at start/end: {m.get('loadavg_start')} / "
        f"{m.get('loadavg_end')} (shared machine)" + busy_warning(m),
        (
            f"- Encoders: {info['blocks']} blocks, d_model {info['d_model']}, "
            f"{info['heads']} heads, FFN {info['units']}, kernel {info['kernel']}, "
            f"{info['input_layer']} subsampling, {info['input_size']}-dim features "
            f"at {FRAMES_PER_SECOND} frames/s. Parameters (counted on the built "
            "modules): "
            + ", ".join(f"{NAMES[n]} {params[n] / 1e6:.2f} M" for n in params)
            if params
            else "- Encoders: only the training step was run (see below)"
        ),
        f"- Timing: engines interleaved in every repeat (order alternating), "
        f"{conf['warmup']} warm-up call(s) each; {conf['min_repeats']}–"
        f"{conf['repeats']} repeats per setting (budget {conf['budget']} s). Cells: "
        "median [25th–75th percentile] ms, timed as CPU time of the calling thread "
        "in 1-thread rows (every engine computes in that thread, so the time the "
        "host's other processes take is left out), wall time with more threads. "
        "Ratios: of medians, and in brackets the "
        "median of the per-repeat (paired) ratios. 'share arch / impl': how much "
        "of FusionFormer's speed-up over ESPnet (on a log scale) comes from the "
        "architecture (FF vs same-code LN) and how much from the implementation "
        f"(same-code LN vs ESPnet). Total run: {result['wall_time_s']:.0f} s"
        + (
            " — **--quick: tiny model, numbers not meaningful**"
            if conf["quick"]
            else ""
        ),
        "",
        *TABLE_HEAD,
    ]
    for row in result["rows"]:
        if row["section"] != "streaming":
            lines.append(table_line(row))
    lines += ["", "## Targets", ""]
    for row in result["rows"]:
        for t in row.get("targets", []):
            ratio = "n/a" if t["ratio"] is None else f"{t['ratio']:.3f}"
            verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
            lines.append(
                f"- {row_label(row)}, {row['threads']} thread(s), FusionFormer / "
                f"{NAMES[t['vs']]}: {ratio} (target ≤ {t['target']:.2f}) — {verdict}"
            )
    lines += attribution_lines(result)
    lines += train_lines(result)
    lines += streaming_lines(result)
    lines += static_lines(result)
    lines += ["", "## Exports", ""]
    for name, entries in result["exports"].items():
        for kind, e in entries.items():
            if not e.get("ok"):
                lines.append(f"- {name} {kind}: **FAILED** — {e.get('error')}")
            elif kind == "int8":
                lines.append(
                    f"- {name} int8: {e.get('method')}; {e.get('size_mb')} MB; "
                    f"relative error of the output vs float {e.get('rel_error')} "
                    f"(random weights and input) ({e.get('seconds')} s)"
                )
            else:
                lines.append(
                    f"- {name} {kind}: {e.get('method')}, max |diff| vs eager "
                    f"{e.get('max_abs_diff', float('nan')):.2e} on lengths/batches "
                    f"other than the traced one ({e.get('seconds')} s)"
                )
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def attribution_lines(result: Dict) -> List[str]:
    """Per engine: the median over lengths of the three ratios (batch-1 rows)."""
    rows = [
        r
        for r in result["rows"]
        if r["section"] == "latency" and r["variant"] == "fused"
    ]
    if not rows:
        return []
    lines = [
        "",
        "## Where the speed-up comes from (batch 1, fused)",
        "",
        "| engine | threads | lengths | FF / ESPnet | FF / LN (architecture) | "
        "LN / ESPnet (implementation) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    groups: Dict = {}
    for r in rows:
        groups.setdefault((r["engine"], r["threads"]), []).append(r)
    for (engine, threads), items in groups.items():
        cells = []
        for key in ("ff_vs_conformer", "ff_vs_layernorm", "layernorm_vs_conformer"):
            values = [r["ratios"][key] for r in items if r["ratios"][key]]
            cells.append(f"{min(values):.2f}–{max(values):.2f}" if values else "n/a")
        lengths = ", ".join(r["label"] for r in items)
        lines.append(
            f"| {ENGINES[engine]} | {threads} | {lengths} | " + " | ".join(cells) + " |"
        )
    return lines


def train_lines(result: Dict) -> List[str]:
    info = result.get("train") or {}
    if not info:
        return []
    lines = [
        "",
        "## Training step (full ESPnet ASR model)",
        "",
        f"- Batches: {info['source']} ({info['batches']} batches of "
        f"{info['batch_sizes']} utterances, {100 * info['padding']:.1f} % padded "
        f"samples; {info['batch_type']} batch_bins {info['batch_bins']}; dump "
        f"{info['dump']}); {info['threads']} thread(s); normalize "
        f"{info['normalize']}.",
        "- Configs (read at run time): "
        + "; ".join(f"{NAMES[n]}: `{c}`" for n, c in info["configs"].items()),
        "- Parameters of the built models (whole ASR model / encoder): "
        + ", ".join(
            f"{NAMES[n]} {info['params'][n] / 1e6:.3f} M / "
            f"{info['encoder_params'][n] / 1e6:.3f} M"
            for n in MODELS
        ),
    ]
    return lines


def streaming_lines(result: Dict) -> List[str]:
    rows = {r["metric"]: r for r in result["rows"] if r["section"] == "streaming"}
    info = result.get("streaming") or {}
    if not rows or not info:
        return []
    lines = [
        "",
        f"## Streaming ({info['audio_s']:g} s utterance, batch 1, "
        f"{info['threads']} thread(s), {info['repeats']} repeats)",
        "",
        "| metric | ContextualBlockConformer (ESPnet) | same code, LayerNorm "
        "(causal, fused, forward_chunk) | FusionFormer (causal, fused, "
        "forward_chunk) | FF / CBC | FF / LN |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    formats = {
        "chunk": (
            "per-chunk latency, median / p90 ms",
            lambda s: f"{s['median_ms']:.1f} / {s['p90_ms']:.1f}",
        ),
        "total": (
            "real-time factor (total compute)",
            lambda s: f"{s['rtf']:.4f} ({s['median_ms']:.0f} ms)",
        ),
        "chunk_onnx": (
            "per-chunk latency, ONNX Runtime (fixed-size caches), median / p90 ms",
            lambda s: f"{s['median_ms']:.1f} / {s['p90_ms']:.1f}",
        ),
        "chunk_int8": (
            "per-chunk latency, ONNX Runtime int8, median / p90 ms",
            lambda s: f"{s['median_ms']:.1f} / {s['p90_ms']:.1f}",
        ),
        "first_token": (
            "first-token latency ms (audio wait + compute)",
            lambda s: (
                f"{s['median_ms']:.0f} ({s['wait_ms']:.0f} wait + "
                f"{s['median_ms'] - s['wait_ms']:.1f})"
            ),
        ),
    }
    for metric, (label, fmt) in formats.items():
        if metric not in rows:
            continue
        r = rows[metric]
        cells = [fmt(r[n]) if r.get(n) else "n/a" for n in MODELS]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | "
            f"{fmt_ratio(r, 'ff_vs_conformer')} | {fmt_ratio(r, 'ff_vs_layernorm')} |"
        )
    if "chunk_onnx" in rows or "chunk_int8" in rows:
        note = (
            "| (ONNX rows: ContextualBlockConformer has no ONNX export here, so "
            "its column is n/a) | | | | | |"
        )
        lines.append(note)
    lines.append(
        "| calls / output frames | "
        + " | ".join(f"{info[n]['calls']} / {info[n]['output_frames']}" for n in MODELS)
        + " | | |"
    )
    lines.append(
        "| parameters (M) | "
        + " | ".join(f"{info[n]['params'] / 1e6:.2f}" for n in MODELS)
        + " | | |"
    )
    return lines


def static_lines(result: Dict) -> List[str]:
    s = result.get("static") or {}
    if not s:
        return []
    names = (CONFORMER, LAYERNORM, FUSIONFORMER, UNFUSED)
    lines = [
        "",
        f"## Cost and profile ({s.get('frames')} frames = "
        f"{s.get('frames', 0) / FRAMES_PER_SECOND:g} s, batch 1, 1 thread, eager)",
        "",
        "| | " + " | ".join(NAMES[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]

    def line(label, key, fmt):
        values = s.get(key, {})
        cells = [fmt(values[n]) if values.get(n) is not None else "—" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    line("parameters (M)", "params_m", lambda v: f"{v:.2f}")
    line("GFLOPs (FlopCounterMode)", "gflops", lambda v: f"{v:.2f}")
    line("peak tensor memory, inference (MB)", "peak_mb", lambda v: f"{v:.1f}")
    line("norm ops share (op names)", "norm_share", pct)
    line("activation ops share (op names)", "act_share", pct)
    line("norm modules share (hooks)", "norm_module_share", pct)
    line("activation modules share (hooks)", "act_module_share", pct)
    return lines
