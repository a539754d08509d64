"""int8 deployment of the fused encoder with ONNX Runtime's dynamic quantization.

The fused encoder is exported to ONNX (``export.export_onnx``), its weight
matmuls are quantized to int8 with ``onnxruntime.quantization.quantize_dynamic``
(weights int8 offline, activations quantized per call), and the result runs in
ONNX Runtime. Why ONNX Runtime and not torchao: on this CPU, torchao 0.18's
``Int8DynamicActivationInt8WeightConfig`` runs a 256x2048 FFN 17x slower than
float (eager and ``torch.compile``), and its weight-only int8 is slower than float
(see ``docs/bench/README.md``); ORT's int8 kernels are the fast path.

Every ``Gemm`` is first rewritten as ``MatMul + Add`` (``gemm_to_matmul``):
``quantize_dynamic`` only quantizes ``MatMul``, and the fused encoder's
feed-forward layers export as ``Gemm``. The file quantized is exported with the
subsampling in im2col form (``export_int8``), whose inputs are then quantized
before their slices (``quantize_before_slicing``).

Use it from ``Speech2Text``::

    from espnet2.bin.asr_inference import Speech2Text
    from espnet_fusionformer.quantize import quantize

    speech2text = Speech2Text("exp/asr/config.yaml", "exp/asr/valid.acc.ave.pth")
    quantize(speech2text.asr_model)  # encoder -> int8 ONNX Runtime, in place
    text = speech2text(speech)[0][0]

or decode a recipe's test set with the float and the int8 model and compare
CERs::

    python -m espnet_fusionformer.quantize --asr_train_config exp/asr/config.yaml \\
        --asr_model_file exp/asr/valid.acc.ave.pth --data_dir dump/raw/test \\
        --out int8_cer
"""

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from espnet2.asr.encoder.abs_encoder import AbsEncoder

# what quantize_dynamic quantizes: weight matmuls (MatMul with a constant B) ...
OP_TYPES = ("MatMul",)
# ... with at least this many input features: the subsampling's first conv (a
# patch matmul over the raw features, 9 inputs) stays float; quantized, it cost
# 0.2 test CER points on the recipe and saved no time
MIN_QUANTIZED_INPUTS = 16


def gemm_to_matmul(model) -> int:
    """Rewrite every ``Gemm(A, B, C)`` with a constant ``B`` (alpha = beta = 1)
    as ``MatMul(A, B') + C`` in place (``B' = B^T`` when ``transB``).

    Returns:
        The number of rewritten nodes.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, count = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        name = f"{node.name or node.output[0]}_matmul_weight"
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], name], [product], node.name)
        )
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], node.name + "_b"
                )
            )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


def quantize_before_slicing(model) -> int:
    """Quantize im2col inputs once, before slicing (in place).

    ``quantize_dynamic`` quantizes a ``MatMul``'s input where the matmul reads it:
    for the subsampling's convolutions (``subsampling.conv2d_as_matmul``) that is
    after the float slices and their ``Concat``, a float copy of ``k * k`` times
    the convolution's input. Each ``DynamicQuantizeLinear`` of a ``Concat`` of
    ``Slice`` chains from one tensor is moved before the slices: the tensor is
    quantized once and sliced and concatenated as uint8 (a quarter of the bytes).
    The scale is computed over the whole input rather than over the slices (the
    same range up to the unread border frames).

    Returns:
        The number of moved quantizations.
    """
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)  # held, so that id() of each node stays its own
    producer = {out: node for node in nodes for out in node.output}
    order = {id(node): i for i, node in enumerate(nodes)}
    drop, insert = set(), {}
    for quant in nodes:
        if quant.op_type != "DynamicQuantizeLinear":
            continue
        concat = producer.get(quant.input[0])
        if concat is None or concat.op_type != "Concat":
            continue
        chain, roots = [], set()
        for name in concat.input:
            node = producer.get(name)
            if node is None or node.op_type != "Slice":
                roots.add(None)
            while node is not None and node.op_type == "Slice":
                chain.append(node)
                name = node.input[0]
                node = producer.get(name)
            roots.add(name)
        # tensors that turn uint8: only the chain, the Concat and quant may read them
        stale = {out for node in chain for out in node.output} | {concat.output[0]}
        inside = {id(node) for node in (*chain, concat, quant)}
        readers = [n for n in nodes if id(n) not in inside]
        if (
            len(roots) != 1
            or None in roots
            or any(name in stale for n in readers for name in n.input)
            or any(out.name in stale for out in graph.output)
        ):
            continue  # not one tensor's im2col, or a slice is read elsewhere too
        root = roots.pop()
        quantized = f"{root}_quantized_for_slices"
        moved = helper.make_node(
            "DynamicQuantizeLinear",
            [root],
            [quantized, quant.output[1], quant.output[2]],
            f"{quant.name}_before_slices",
        )
        for node in chain:
            if node.input[0] == root:
                node.input[0] = quantized
        concat.output[0] = quant.output[0]  # the uint8 Concat feeds the matmul
        kept = [v for v in graph.value_info if v.name not in stale]  # now uint8
        del graph.value_info[:]
        graph.value_info.extend(kept)
        drop.add(id(quant))
        insert[id(min(chain, key=lambda node: order[id(node)]))] = moved
    rewritten = []
    for node in nodes:
        if id(node) in insert:
            rewritten.append(insert[id(node)])
        if id(node) not in drop:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    return len(drop)


def narrow_matmuls(model) -> List[str]:
    """Names of the ``MatMul`` nodes whose constant weight has fewer than
    ``MIN_QUANTIZED_INPUTS`` rows (input features)."""
    inits = {t.name: t for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and node.name
        and node.input[1] in inits
        and inits[node.input[1]].dims[0] < MIN_QUANTIZED_INPUTS
    ]


def quantize_onnx(src, dst, per_channel: bool = False) -> Path:
    """int8 dynamic quantization of an ONNX file's weight matmuls (but those with
    fewer than ``MIN_QUANTIZED_INPUTS`` input features).

    Args:
        src: float ONNX file (e.g. from ``export.export_onnx``).
        dst: output file.
        per_channel: one scale per output channel of each weight.
            (Default: ``False``)

    Returns:
        ``dst`` as a ``Path``.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    gemm_to_matmul(model)
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "matmul.onnx"
        onnx.save(model, str(plain))
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        quantize_dynamic(
            str(plain),
            str(dst),
            op_types_to_quantize=list(OP_TYPES),
            nodes_to_exclude=narrow_matmuls(model),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    model = onnx.load(str(dst))
    if quantize_before_slicing(model):
        onnx.save(model, str(dst))
    return dst


def export_int8(export: Callable[[Path], object], dst) -> Path:
    """``export(path)``, a float ONNX export, in the form int8 wants
    (``subsampling.im2col_export``) to a temporary file, quantized to ``dst``
    (``quantize_onnx``). The float form of the subsampling measured faster in
    float and slower in int8."""
    from espnet_fusionformer.subsampling import im2col_export

    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float.onnx"
        with im2col_export():
            export(src)
        return quantize_onnx(src, dst)


class OnnxEncoder(AbsEncoder):
    """An ESPnet encoder that runs an exported encoder file in ONNX Runtime.

    Takes and returns what ``ESPnetASRModel.encode`` expects: ``(B, T, F)``
    features and ``(B,)`` lengths -> ``(B, T', D)``, ``(B,)``, ``None``. CPU,
    inference only (no gradient).

    Args:
        path: ONNX file with inputs ``feats``, ``feats_lengths`` and outputs
            ``encoded``, ``encoded_lengths`` (``export.export_onnx``).
        output_size: ``D``.
        threads: ONNX Runtime intra-op threads; ``None``: its default.
    """

    def __init__(self, path, output_size: int, threads: Optional[int] = None):
        super().__init__()
        from espnet_fusionformer.export import onnx_session

        self.path = str(path)
        self._output_size = int(output_size)
        self.session = onnx_session(self.path, threads)

    def output_size(self) -> int:
        return self._output_size

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, None]:
        feeds = {
            "feats": xs_pad.detach().cpu().float().numpy(),
            "feats_lengths": ilens.detach().cpu().long().numpy(),
        }
        ys, olens = self.session.run(["encoded", "encoded_lengths"], feeds)
        device = xs_pad.device
        return torch.from_numpy(ys).to(device), torch.from_numpy(olens).to(device), None

    def __getstate__(self):  # sessions do not pickle: rebuilt from the file
        state = self.__dict__.copy()
        state.pop("session", None)
        return state

    def __setstate__(self, state):
        from espnet_fusionformer.export import onnx_session

        self.__dict__.update(state)
        self.session = onnx_session(self.path)


def quantize(
    asr_model: torch.nn.Module,
    path=None,
    int8: bool = True,
    threads: Optional[int] = None,
) -> torch.nn.Module:
    """Replace the FusionFormer encoder of an ESPnet ASR model (in place) by its
    fused, int8, ONNX Runtime form.

    Args:
        asr_model: e.g. ``Speech2Text(...).asr_model``, in eval mode.
        path: where to write the int8 ONNX file; default: a temporary directory
            that lives as long as the process.
        int8: ``False`` keeps float weights (the same ONNX route, unquantized).
        threads: ONNX Runtime intra-op threads.

    Returns:
        ``asr_model``, whose ``encoder`` is now an ``OnnxEncoder``.

    Raises:
        TypeError: if the encoder is not a ``FusionFormerEncoder``.
        RuntimeError: if the model is in training mode.
    """
    from espnet_fusionformer.export import export_onnx

    encoder = asr_model.encoder
    if path is None:
        tmp = tempfile.mkdtemp(prefix="fusionformer-int8-")
        path = Path(tmp) / ("encoder.int8.onnx" if int8 else "encoder.onnx")
    path = Path(path)
    if int8:  # type and mode checks, verified float export
        export_int8(lambda src: export_onnx(encoder, src), path)
    else:
        export_onnx(encoder, path)
    asr_model.encoder = OnnxEncoder(path, encoder.output_size(), threads)
    return asr_model


# -- CER of the float and the int8 model on a data directory ------------------------
def read_data_dir(
    data_dir, max_utts: Optional[int] = None
) -> List[Tuple[str, str, str]]:
    """``(utt, audio path, reference text)`` of a Kaldi-style dir (``wav.scp``,
    ``text``); relative audio paths are taken from the recipe root (the dir above
    ``dump``/``data``) when they do not exist as given."""
    data_dir = Path(data_dir)
    texts = dict(
        line.rstrip("\n").split(" ", 1)
        for line in (data_dir / "text").read_text().splitlines()
        if " " in line
    )
    root = next(
        (p for p in data_dir.resolve().parents if (p / "dump").is_dir()), Path(".")
    )
    items = []
    for line in (data_dir / "wav.scp").read_text().splitlines():
        utt, audio = line.split(maxsplit=1)
        if utt not in texts:
            continue
        if not Path(audio).exists() and (root / audio).exists():
            audio = str(root / audio)
        items.append((utt, audio, texts[utt]))
        if max_utts and len(items) >= max_utts:
            break
    if not items:
        raise ValueError(f"{data_dir}: no utterance has both wav.scp and text")
    return items


def char_errors(ref: str, hyp: str) -> Tuple[int, int]:
    """Character edit distance (spaces removed) and reference length."""
    import editdistance

    ref, hyp = ref.replace(" ", ""), hyp.replace(" ", "")
    return editdistance.eval(ref, hyp), len(ref)


def decode_cer(speech2text, items, desc: str) -> Dict:
    """Decode every item with ``speech2text``: CER (%), decoding seconds, texts."""
    import soundfile
    from tqdm import tqdm

    errors = total = 0
    hyps, seconds = {}, 0.0
    for utt, audio, ref in tqdm(items, desc=desc, leave=False):
        speech, _ = soundfile.read(audio, dtype="float32")
        start = time.perf_counter()
        hyp = speech2text(speech)[0][0]
        seconds += time.perf_counter() - start
        e, n = char_errors(ref, hyp)
        errors, total = errors + e, total + n
        hyps[utt] = hyp
    return dict(
        cer=round(100 * errors / max(total, 1), 2),
        errors=errors,
        chars=total,
        seconds=round(seconds, 2),
        hyps=hyps,
    )


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionformer-int8-cer",
        description="Decode a data dir with the float model and with its int8 "
        "encoder (ONNX Runtime dynamic quantization) and compare the CERs.",
    )
    parser.add_argument("--asr_train_config", required=True)
    parser.add_argument("--asr_model_file", required=True)
    parser.add_argument("--data_dir", required=True, help="wav.scp + text")
    parser.add_argument("--out", default="int8_cer", help="output directory")
    parser.add_argument("--max_utts", type=int, help="decode only the first N")
    parser.add_argument("--beam_size", type=int, default=10)
    parser.add_argument("--ctc_weight", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """CLI: CER of the float and the int8 model; writes ``<out>/int8_cer.json``."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from espnet2.bin.asr_inference import Speech2Text

    import espnet_fusionformer

    espnet_fusionformer.register()
    torch.set_num_threads(args.threads)
    items = read_data_dir(args.data_dir, args.max_utts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in ("float", "int8"):
        speech2text = Speech2Text(
            args.asr_train_config,
            args.asr_model_file,
            device="cpu",
            beam_size=args.beam_size,
            ctc_weight=args.ctc_weight,
            nbest=1,
        )
        if name == "int8":
            quantize(speech2text.asr_model, out / "encoder.int8.onnx", True, 1)
        with torch.inference_mode():
            results[name] = decode_cer(speech2text, items, name)
        print(f"{name}: CER {results[name]['cer']:.2f} % ({len(items)} utterances)")
    report = dict(
        data_dir=str(args.data_dir),
        utterances=len(items),
        cer_float=results["float"]["cer"],
        cer_int8=results["int8"]["cer"],
        cer_diff=round(results["int8"]["cer"] - results["float"]["cer"], 2),
        seconds_float=results["float"]["seconds"],
        seconds_int8=results["int8"]["seconds"],
        same_hyps=sum(
            results["float"]["hyps"][u] == results["int8"]["hyps"][u]
            for u in results["float"]["hyps"]
        ),
        asr_train_config=str(args.asr_train_config),
        asr_model_file=str(args.asr_model_file),
        beam_size=args.beam_size,
        ctc_weight=args.ctc_weight,
        threads=args.threads,
        hyps=dict(float=results["float"]["hyps"], int8=results["int8"]["hyps"]),
    )
    (out / "int8_cer.json").write_text(json.dumps(report, indent=1))
    print(
        f"int8 - float: {report['cer_diff']:+.2f} CER points; "
        f"{report['same_hyps']}/{len(items)} identical hypotheses; wrote "
        f"{out / 'int8_cer.json'}"
    )
    return report


if __name__ == "__main__":
    main()
