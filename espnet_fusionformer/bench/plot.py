"""The benchmark's chart: one panel per engine (and streaming, training), bars
for ESPnet's Conformer, the same code with LayerNorm and FusionFormer."""

import math
from pathlib import Path
from typing import Dict, List

from espnet_fusionformer.bench.cases import (
    CONFORMER,
    FUSIONFORMER,
    LAYERNORM,
    NAMES,
    UNFUSED,
)
from espnet_fusionformer.bench.engines import ENGINES

COLORS = {CONFORMER: "#888888", LAYERNORM: "#ff7f0e", FUSIONFORMER: "#1f77b4"}


def panel(r: Dict) -> str:
    if r["section"] == "latency":
        return f"{ENGINES[r['engine']]}, batch 1, {r['threads']} thread(s)"
    if r["section"] == "throughput":
        return f"batch {r['batch']} mixed ({r['audio_s']:g} s), {r['threads']} thr"
    if r["section"] == "streaming":
        return f"streaming {r['audio_s']:g} s, chunk 640 ms (ESPnet: CBC)"
    return f"training step, full ASR model, {r['threads']} thread(s)"


def tick(r: Dict) -> str:
    if r["section"] == "latency":
        return r["label"]
    if r["section"] == "streaming":
        return {
            "chunk": "per chunk",
            "total": "whole",
            "first_token": "1st token",
            "chunk_onnx": "ORT chunk",
            "chunk_int8": "int8 chunk",
        }[r["metric"]]
    if r["section"] == "throughput":
        return {"eager": "eager", "onnxruntime": "ORT", "int8": "ORT int8"}.get(
            r["engine"], r["engine"]
        )
    return "step"


def plot(result: Dict, path: Path) -> None:
    """Write the chart (log-scale ms; labels: FF/ESPnet and FF/LN ratios, green
    where a target is met, red where missed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[Dict]] = {}
    for r in result["rows"]:
        if r["variant"] == UNFUSED:
            continue
        groups.setdefault(panel(r), []).append(r)
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.6 * cols, 4.0 * rows), squeeze=False
    )
    width = 0.27
    for ax, (title, items) in zip(axes.flat, groups.items()):
        tops = [0.0] * len(items)
        for k, name in enumerate((CONFORMER, LAYERNORM, FUSIONFORMER)):
            ms = [r[name]["median_ms"] if r.get(name) else 0 for r in items]
            tops = [max(a, b) for a, b in zip(tops, ms)]
            label = NAMES[name]
            if items[0]["section"] == "streaming" and name == CONFORMER:
                label = "ESPnet ContextualBlockConformer"
            ax.bar(
                [i + (k - 1) * width for i in range(len(items))],
                ms,
                width,
                label=label,
                color=COLORS[name],
            )
        for i, r in enumerate(items):
            met = [t["met"] for t in r.get("targets", []) if t["met"] is not None]
            color = "black" if not met else ("green" if all(met) else "red")
            a, b = r["ratios"]["ff_vs_conformer"], r["ratios"]["ff_vs_layernorm"]
            text = "\n".join(
                s
                for s in (
                    f"{a:.2f} E" if a is not None else "",
                    f"{b:.2f} L" if b is not None else "",
                )
                if s
            )
            ax.annotate(
                text,
                (i, tops[i]),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
                color=color,
            )
        positive = [t for t in tops if t > 0]
        if positive:
            ax.set_yscale("log")
            ax.set_ylim(min(positive) / 4, max(positive) * 4)
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([tick(r) for r in items], fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m, info = result["machine"], result["models"]
    others = m.get("other_busy_cores")
    load = (
        f"other processes {others:.2f} cores"
        if others is not None
        else f"load {m.get('loadavg_start', ['?'])[0]}"
    )
    fig.suptitle(
        f"FusionFormer vs ESPnet Conformer (E) and same-code LayerNorm (L), "
        f"{info.get('blocks')} blocks d={info.get('d_model')}; {m['cpu']}, torch "
        f"{m['torch']}, {load} — labels: "
        "FusionFormer / baseline (green: target met, red: missed)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
