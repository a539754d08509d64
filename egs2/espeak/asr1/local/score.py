#!/usr/bin/env python3
"""sclite-like scoring in Python (stage 13 of the pip-only asr.sh).

Tokenizes reference and hypothesis the way ESPnet's stage 13 does with
espnet2.bin.tokenize_text (char: one token per character, spaces as
"<space>"; word: whitespace split; bpe: sentencepiece pieces), writes
ref.trn / hyp.trn ("tokens<TAB>(spk-utt)") and a result.txt laid out like
``sclite -i rm -o all stdout``: per-utterance alignments, then the
"SYSTEM SUMMARY PERCENTAGES by SPEAKER" table whose "SPKR" and "Sum/Avg" lines
ESPnet's tools grep. Alignment uses sclite's weights (sub 4, ins 3, del 3).
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from pathlib import Path

W_SUB, W_INS, W_DEL = 4, 3, 3


def read_text(path: str) -> dict[str, str]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                key, _, value = line.partition(" ")
                out[key] = value.strip()
    return out


def read_nlsyms(path: str | None) -> list[str]:
    if not path or path == "none" or not Path(path).exists():
        return []
    return [s.strip() for s in Path(path).read_text().splitlines() if s.strip()]


class Tokenizer:
    def __init__(self, token_type: str, bpemodel: str | None, nlsyms: list[str]):
        self.token_type = token_type
        self.nlsyms = nlsyms
        self.sp = None
        if token_type == "bpe":
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor()
            self.sp.load(bpemodel)

    def __call__(self, text: str) -> list[str]:
        for sym in self.nlsyms:  # --remove_non_linguistic_symbols true
            text = text.replace(sym, "")
        if self.token_type == "char":
            return ["<space>" if c == " " else c for c in " ".join(text.split())]
        if self.token_type == "word":
            return text.split()
        return list(self.sp.encode_as_pieces(text))


@dataclass
class Align:
    ops: list[tuple[str, str | None, str | None]]  # (C|S|D|I, ref, hyp)

    def count(self, op: str) -> int:
        return sum(1 for o in self.ops if o[0] == op)


def align(ref: list[str], hyp: list[str]) -> Align:
    n, m = len(ref), len(hyp)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    back = [[""] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0], back[i][0] = i * W_DEL, "D"
    for j in range(1, m + 1):
        cost[0][j], back[0][j] = j * W_INS, "I"
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            same = ref[i - 1] == hyp[j - 1]
            choices = [
                (cost[i - 1][j - 1] + (0 if same else W_SUB), "C" if same else "S"),
                (cost[i - 1][j] + W_DEL, "D"),
                (cost[i][j - 1] + W_INS, "I"),
            ]
            cost[i][j], back[i][j] = min(choices, key=lambda c: c[0])
    ops = []
    i, j = n, m
    while i > 0 or j > 0:
        op = back[i][j]
        if op in ("C", "S"):
            ops.append((op, ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif op == "D":
            ops.append((op, ref[i - 1], None))
            i -= 1
        else:
            ops.append((op, None, hyp[j - 1]))
            j -= 1
    return Align(ops[::-1])


def pra_block(uid: str, a: Align) -> str:
    refs, hyps, evals = [], [], []
    for op, r, h in a.ops:
        r_s = r if r is not None else "*" * len(h or "")
        h_s = h if h is not None else "*" * len(r or "")
        if op in ("S", "I", "D"):
            r_s, h_s = r_s.upper(), h_s.upper()
        width = max(len(r_s), len(h_s))
        refs.append(r_s.ljust(width))
        hyps.append(h_s.ljust(width))
        evals.append(("" if op == "C" else op).ljust(width))
    c, s, d, i = (a.count(x) for x in "CSDI")
    return (
        f"id: ({uid})\n"
        f"Scores: (#C #S #D #I) {c} {s} {d} {i}\n"
        f"REF:  {' '.join(refs)}\n"
        f"HYP:  {' '.join(hyps)}\n"
        f"Eval: {' '.join(evals)}\n\n"
    )


def pct(x: float, n: int) -> float:
    return 100.0 * x / n if n else 0.0


def summary(hyp_name: str, stats: dict[str, list[Align]]) -> str:
    def row(label: str, snt, wrd, vals) -> str:
        cols = " ".join(f"{v:6.1f}" for v in vals)
        return f"| {label:<10} | {snt:>5} {wrd:>6} | {cols} |"

    def numbers(aligns: list[Align]):
        nref = sum(a.count("C") + a.count("S") + a.count("D") for a in aligns)
        c = sum(a.count("C") for a in aligns)
        s = sum(a.count("S") for a in aligns)
        d = sum(a.count("D") for a in aligns)
        i = sum(a.count("I") for a in aligns)
        serr = sum(1 for a in aligns if any(o[0] != "C" for o in a.ops))
        vals = [pct(c, nref), pct(s, nref), pct(d, nref), pct(i, nref)]
        vals += [pct(s + d + i, nref), pct(serr, len(aligns))]
        return len(aligns), nref, vals

    rule = "|" + "-" * 12 + "+" + "-" * 14 + "+" + "-" * 43 + "|"
    dbl = "|" + "=" * 12 + "+" + "=" * 14 + "+" + "=" * 43 + "|"
    width = len(rule)
    lines = [
        "SYSTEM SUMMARY PERCENTAGES by SPEAKER".center(width),
        "",
        "," + "-" * (width - 2) + ".",
        "|" + hyp_name.center(width - 2) + "|",
        "|" + "-" * (width - 2) + "|",
        "| SPKR       | # Snt  # Wrd | "
        + " ".join(f"{h:>6}" for h in ("Corr", "Sub", "Del", "Ins", "Err", "S.Err"))
        + " |",
        rule,
    ]
    per_spk = []
    for spk in sorted(stats):
        snt, wrd, vals = numbers(stats[spk])
        per_spk.append((snt, wrd, vals))
        lines.append(row(spk, snt, wrd, vals))
        lines.append(rule)
    snt, wrd, vals = numbers([a for v in stats.values() for a in v])
    lines[-1] = dbl
    lines.append(row("Sum/Avg", snt, wrd, vals))
    lines.append(dbl)
    for name, fn in (("Mean", statistics.mean), ("Median", statistics.median)):
        cols = [fn([p[2][k] for p in per_spk]) for k in range(6)]
        lines.append(
            f"| {name:<10} | {fn([p[0] for p in per_spk]):>5.1f} "
            f"{fn([p[1] for p in per_spk]):>6.1f} | "
            + " ".join(f"{v:6.1f}" for v in cols)
            + " |"
        )
    lines.append("`" + "-" * (width - 2) + "'")
    return "\n".join(lines) + "\n"


def score(
    ref_text: str,
    hyp_text: str,
    utt2spk: str,
    token_type: str,
    outdir: str,
    bpemodel: str | None = None,
    nlsyms: list[str] | None = None,
) -> tuple[float, int]:
    """Write ref.trn, hyp.trn and result.txt; return (error rate %, #ref tokens)."""
    tok = Tokenizer(token_type, bpemodel, nlsyms or [])
    refs, hyps, spk = read_text(ref_text), read_text(hyp_text), read_text(utt2spk)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, list[Align]] = {}
    blocks = []
    with open(out / "ref.trn", "w") as fr, open(out / "hyp.trn", "w") as fh:
        for utt in sorted(refs):
            r, h = tok(refs[utt]), tok(hyps.get(utt, ""))
            uid = f"{spk.get(utt, utt)}-{utt}"
            fr.write(f"{' '.join(r)}\t({uid})\n")
            fh.write(f"{' '.join(h)}\t({uid})\n")
            a = align(r, h)
            stats.setdefault(uid.split("-")[0], []).append(a)
            blocks.append(pra_block(uid, a))
    all_aligns = [a for v in stats.values() for a in v]
    nref = sum(len([o for o in a.ops if o[0] != "I"]) for a in all_aligns)
    nerr = sum(len([o for o in a.ops if o[0] != "C"]) for a in all_aligns)
    missing = len(set(refs) - set(hyps))
    with open(out / "result.txt", "w") as f:
        f.write(
            "sclite-compatible scoring by local/score.py "
            f"(token_type={token_type}, weights sub={W_SUB} ins={W_INS} "
            f"del={W_DEL})\n\n"
        )
        f.write(
            f"Reference file: {out / 'ref.trn'}\nHypothesis file: {out / 'hyp.trn'}\n"
        )
        if missing:
            f.write(
                f"WARNING: {missing} utterances have no hypothesis (scored empty)\n"
            )
        f.write("\n" + "".join(blocks))
        f.write(summary(str(out / "hyp.trn"), stats))
    return pct(nerr, nref), nref


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="reference Kaldi text")
    p.add_argument("--hyp", required=True, help="hypothesis Kaldi text")
    p.add_argument("--utt2spk", required=True)
    p.add_argument("--token_type", choices=["char", "word", "bpe"], required=True)
    p.add_argument("--bpemodel", default=None)
    p.add_argument("--non_linguistic_symbols", default="none")
    p.add_argument("--outdir", required=True)
    args = p.parse_args(argv)
    err, n = score(
        args.ref,
        args.hyp,
        args.utt2spk,
        args.token_type,
        args.outdir,
        args.bpemodel,
        read_nlsyms(args.non_linguistic_symbols),
    )
    print(f"{args.outdir}/result.txt: {err:.1f}% errors over {n} tokens")


if __name__ == "__main__":
    main()
