#!/usr/bin/env python3
"""Training curves (loss and accuracy per epoch) of several ESPnet experiments.

Reads the "<N>epoch results: [train] ... [valid] ..." lines of each
<exp>/train.log (ESPnet's trainer writes one per epoch) and draws train/valid
loss and accuracy for all experiments in one PNG. Non-finite values (a diverged
run) are drawn as gaps and marked in the legend.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

EPOCH = re.compile(r"(\d+)epoch results: (.*)")
SECTION = re.compile(r"\[(\w+)\] ([^\[]*)")


def parse_log(path: Path) -> dict[int, dict[str, dict[str, float]]]:
    """{epoch: {"train": {"loss": .., "acc": ..}, "valid": {...}}}; last one wins."""
    epochs: dict[int, dict[str, dict[str, float]]] = {}
    logs = sorted(path.parent.glob("train.*.log"), reverse=True) + [path]
    for log in logs:  # older (rotated) logs first, so a resumed run extends them
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            m = EPOCH.search(line)
            if not m:
                continue
            stats: dict[str, dict[str, float]] = {}
            for sec, body in SECTION.findall(m.group(2)):
                values = {}
                for item in body.split(","):
                    key, _, val = item.strip().partition("=")
                    try:
                        values[key] = float(val)
                    except ValueError:
                        continue
                stats[sec] = values
            epochs[int(m.group(1))] = stats
    return epochs


def series(epochs, section: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for e in sorted(epochs):
        v = epochs[e].get(section, {}).get(key)
        if v is not None:
            xs.append(e)
            ys.append(v if math.isfinite(v) else float("nan"))
    return xs, ys


def label_of(exp: Path) -> str:
    name = exp.name
    name = name.removeprefix("asr_train_").removeprefix("asr_")
    return re.sub(r"_raw_.*$", "", name)


def system_of(label: str) -> str:
    """``conformer_seed2`` -> ``conformer``: the runs of one system."""
    return re.sub(r"_seed\d+$", "", label)


def plot(exps: list[Path], out: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = [
        (axes[0][0], "train", "loss", "train loss"),
        (axes[0][1], "valid", "loss", "valid loss"),
        (axes[1][0], "train", "acc", "train accuracy (attention decoder)"),
        (axes[1][1], "valid", "acc", "valid accuracy (attention decoder)"),
    ]
    colors: dict[str, str] = {}  # one colour per system; its seeds share it
    for exp in exps:
        epochs = parse_log(exp / "train.log")
        if not epochs:
            continue
        system = system_of(label_of(exp))
        label = None if system in colors else system
        colors.setdefault(system, f"C{len(colors)}")
        bad = any(
            not math.isfinite(epochs[e].get(s, {}).get("loss", 0.0))
            for e in epochs
            for s in ("train", "valid")
        )
        if bad:
            label = f"{label_of(exp)} (non-finite loss)"
        for ax, sec, key, _ in panels:
            xs, ys = series(epochs, sec, key)
            ax.plot(
                xs,
                ys,
                color=colors[system],
                marker="o",
                markersize=2,
                lw=1,
                alpha=0.8,
                label=label,
            )
    for ax, _sec, key, name in panels:
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0][1].legend(fontsize=8)
    fig.suptitle(title or "Training curves")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exps", nargs="+", type=Path, help="experiment directories")
    p.add_argument("--out", type=Path, default=Path("curves.png"))
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    plot(args.exps, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
