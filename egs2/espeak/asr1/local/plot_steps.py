#!/usr/bin/env python3
"""Training loss per logged interval of short runs (local/ablation_depth.sh).

Reads ESPnet's "<E>epoch:train:<a>-<b>batch: ... loss=..., grad_norm=..." lines
of each <exp>/train.log and ESPnet's warnings about skipped non-finite steps;
draws loss and gradient norm against the step (PNG) and writes a table (Markdown)
saying whether each run diverged.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from plot_curves import label_of

INTERVAL = re.compile(r"\d+epoch:train:(\d+)-(\d+)batch: (.*)")
SKIPPED = re.compile(r"grad norm is (nan|inf)", re.IGNORECASE)


def parse(log: Path) -> tuple[list[dict], int]:
    """Logged intervals ``{"step", "loss", "grad_norm", "lr"}`` and skipped steps."""
    rows = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        m = INTERVAL.search(line)
        if not m:
            continue
        values = {}
        for item in m.group(3).split(","):
            key, _, val = item.strip().partition("=")
            try:
                values[key] = float(val)
            except ValueError:
                pass
        rows.append(
            {
                "step": int(m.group(2)),
                "loss": values.get("loss", math.nan),
                "grad_norm": values.get("grad_norm", math.nan),
                "lr": values.get("optim0_lr0", math.nan),
            }
        )
    return rows, len(SKIPPED.findall(text))


def verdict(rows: list[dict], skipped: int) -> str:
    losses = [r["loss"] for r in rows]
    if not rows:
        return "no steps logged (failed to start?)"
    if skipped or any(not math.isfinite(x) for x in losses):
        bad = sum(not math.isfinite(x) for x in losses)
        return f"diverged: {skipped} skipped steps, {bad} non-finite intervals"
    best = min(losses)
    if losses[-1] > 2 * best:
        return f"diverged: loss back up to {losses[-1]:.1f} from {best:.1f}"
    return "stable"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exps", nargs="+", type=Path)
    p.add_argument("--png", type=Path, default=Path("images/ablation_depth.png"))
    p.add_argument("--md", type=Path, default=Path("ABLATION_DEPTH.md"))
    args = p.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = [
        "|run|logged steps|first loss|lowest loss|last loss|max grad norm|verdict|",
        "|---|---|---|---|---|---|---|",
    ]
    for exp in args.exps:
        rows, skipped = parse(exp / "train.log")
        label = label_of(exp)
        if rows:
            steps = [r["step"] for r in rows]
            ax_loss.plot(steps, [r["loss"] for r in rows], label=label)
            ax_grad.plot(steps, [r["grad_norm"] for r in rows], label=label)
        losses = [r["loss"] for r in rows] or [math.nan]
        grads = [r["grad_norm"] for r in rows if math.isfinite(r["grad_norm"])]
        lines.append(
            f"|{label}|{rows[-1]['step'] if rows else 0}|{losses[0]:.1f}"
            f"|{min(losses):.1f}|{losses[-1]:.1f}|{max(grads, default=math.nan):.0f}"
            f"|{verdict(rows, skipped)}|"
        )
    for ax, name in ((ax_loss, "training loss"), (ax_grad, "gradient norm")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    args.md.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.png} and {args.md}")


if __name__ == "__main__":
    main()
