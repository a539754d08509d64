"""int8 deployment: Gemm -> MatMul rewrite, quantized ONNX close to float, the
encoder swapped into an ESPnet model / Speech2Text, the export CLI's --int8 and the
float-vs-int8 CER CLI."""

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import FEATS, TINY, asr_config, batch, make_encoder, warm_up
from espnet2.tasks.asr import ASRTask

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from espnet_fusionformer import fuse  # noqa: E402
from espnet_fusionformer.export import (  # noqa: E402
    OnnxStream,
    export_onnx,  # noqa: E402
    onnx_session,
)
from espnet_fusionformer.export import main as export_main  # noqa: E402
from espnet_fusionformer.quantize import (  # noqa: E402
    OnnxEncoder,
    export_int8,
    gemm_to_matmul,
    main,
    quantize,
    quantize_before_slicing,
)
from espnet_fusionformer.streaming import encode_chunk_by_chunk  # noqa: E402


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    encoder = warm_up(make_encoder())
    path = export_onnx(encoder, tmp_path_factory.mktemp("onnx") / "encoder.onnx")
    return encoder, path


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def uint8_im2cols(path) -> int:
    """MatMulIntegers of ``path`` that read a Concat (of uint8 im2col slices)."""
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    return sum(
        n.input[0] in producer and producer[n.input[0]].op_type == "Concat"
        for n in model.graph.node
        if n.op_type == "MatMulInteger"
    )


def test_gemm_to_matmul_keeps_the_outputs(float_onnx, tmp_path):
    encoder, path = float_onnx
    model = onnx.load(str(path))
    gemms = ops(path).count("Gemm")
    assert gemms > 0  # the fused FFNs export as Gemm
    assert gemm_to_matmul(model) == gemms
    assert "Gemm" not in [n.op_type for n in model.graph.node]
    onnx.save(model, str(tmp_path / "matmul.onnx"))
    ref = OnnxEncoder(path, 32)
    out = OnnxEncoder(tmp_path / "matmul.onnx", 32)
    xs, ilens = batch([90, 61])
    a, alens, _ = ref(xs, ilens)
    b, blens, _ = out(xs, ilens)
    assert torch.equal(alens, blens)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _im2col_graph(extra_reader: bool):
    """x (1, 6, 8) -> two strided slices -> Concat -> DynamicQuantizeLinear ->
    MatMulInteger -> y; with ``extra_reader`` one slice is also a graph output."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    weight = (np.arange(64).reshape(16, 4) - 32).astype(np.int8)  # (2 * 8, 4)
    nodes = [
        helper.make_node("Slice", ["x", "s0", "e0", "ax", "st"], ["a"], "slice_a"),
        helper.make_node("Slice", ["x", "s1", "e1", "ax", "st"], ["b"], "slice_b"),
        helper.make_node("Concat", ["a", "b"], ["cols"], "concat", axis=-1),
        helper.make_node("DynamicQuantizeLinear", ["cols"], ["q", "sc", "zp"], "dql"),
        helper.make_node("MatMulInteger", ["q", "w", "zp"], ["y"], "mm"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.INT32, None)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes,
        "im2col",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
        outputs,
        [
            const("s0", [0]),
            const("e0", [5]),
            const("s1", [1]),
            const("e1", [6]),
            const("ax", [1]),
            const("st", [2]),
            numpy_helper.from_array(weight, "w"),
        ],
    )
    # the float value_info of the slices, as onnx export writes it
    graph.value_info.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8]) for n in "ab"
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_quantize_before_slicing_moves_the_quantization_of_an_im2col(tmp_path):
    import onnxruntime as ort

    x = np.abs(np.random.default_rng(0).standard_normal((1, 6, 8))).astype("float32")

    def run(model):
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": x})[0]

    before = run(_im2col_graph(False))
    model = _im2col_graph(False)
    assert quantize_before_slicing(model) == 1
    ops_ = [n.op_type for n in model.graph.node]
    # one quantization, of x itself, before the slices; the Concat is uint8
    assert (
        ops_[0] == "DynamicQuantizeLinear" and ops_.count("DynamicQuantizeLinear") == 1
    )
    assert model.graph.node[0].input[0] == "x"
    np.testing.assert_array_equal(run(model), before)  # x's range = the slices'
    # a slice that is also read elsewhere must stay float: nothing moves
    shared = _im2col_graph(True)
    assert quantize_before_slicing(shared) == 0
    assert [n.op_type for n in shared.graph.node][3] == "DynamicQuantizeLinear"


def test_int8_file_has_integer_matmuls_and_stays_close(float_onnx, tmp_path):
    encoder, _ = float_onnx
    int8 = export_int8(
        lambda src: export_onnx(encoder, src), tmp_path / "encoder.int8.onnx"
    )
    names = ops(int8)
    # every weight matmul is quantized (FFN Gemms included), none left in float
    # per block: 2 FFNs x 2, q/k/v + output, 2 pointwise convs; none left in float
    assert names.count("MatMulInteger") >= 2 * (4 + 2 + 2) + 1
    assert "Gemm" not in names
    # the subsampling's convs export as MatMuls (no Conv but the depthwise ones);
    # the first, over the raw features' 3x3 patches (9 inputs), stays float ...
    assert names.count("Conv") == TINY["num_blocks"]
    model = onnx.load(str(int8))
    inits = {t.name: t for t in model.graph.initializer}
    float_weights = [
        list(inits[n.input[1]].dims)
        for n in model.graph.node
        if n.op_type == "MatMul" and n.input[1] in inits
    ]
    assert float_weights == [[9, TINY["output_size"]]]
    # ... and the inner one (the largest layer) is int8, its input quantized before
    # the im2col slices: its Concat of slices is uint8 and feeds a MatMulInteger
    assert uint8_im2cols(int8) == 1
    weights = [i for i in onnx.load(str(int8)).graph.initializer if i.data_type == 3]
    assert sum(np.prod(w.dims) for w in weights) > 2 * 4 * 32 * 64  # int8 weights
    xs, ilens = batch([120, 80])
    with torch.no_grad():
        ref, ref_lens = fuse(encoder).encode(xs, ilens)
    ys, olens, _ = OnnxEncoder(int8, 32)(xs, ilens)
    assert torch.equal(olens, ref_lens)
    for b, n in enumerate(ref_lens.tolist()):
        rel = (ys[b, :n] - ref[b, :n]).norm() / ref[b, :n].norm()
        # quantized (not float), yet close; on this random model most of the error
        # comes from the attention projections (sharp random attention)
        assert 1e-4 < rel < 0.25


def _asr_model_dir(tmp_path, **encoder_conf):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(asr_config(**encoder_conf)))
    args = ASRTask.get_parser().parse_args(["--config", str(config)])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    warm_up(model.encoder)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    return model.eval(), tmp_path / "train.yaml", tmp_path / "model.pth"


def test_quantize_swaps_the_encoder_of_an_asr_model(tmp_path):
    model, _, _ = _asr_model_dir(tmp_path)
    xs = torch.randn(2, 4000)
    lens = torch.tensor([4000, 3000])
    with torch.no_grad():
        ref, ref_lens = model.encode(xs, lens)
    quantize(model, tmp_path / "enc.int8.onnx")
    assert isinstance(model.encoder, OnnxEncoder)
    assert (tmp_path / "enc.int8.onnx").exists()
    with torch.no_grad():
        ys, olens = model.encode(xs, lens)
    assert torch.equal(olens, ref_lens)
    rel = (ys - ref).norm() / ref.norm()
    assert 1e-4 < rel < 0.25


def test_quantize_refuses_other_encoders_and_training_mode(tmp_path):
    model, _, _ = _asr_model_dir(tmp_path)
    with pytest.raises(RuntimeError, match="training mode"):
        quantize(model.train(), tmp_path / "x.onnx")
    model.eval().encoder = torch.nn.Linear(2, 2).eval()
    with pytest.raises(TypeError, match="FusionFormerEncoder"):
        quantize(model, tmp_path / "y.onnx")


def test_export_cli_int8(tmp_path):
    _, config, weights = _asr_model_dir(tmp_path)
    out = tmp_path / "exported"
    info = export_main(
        [
            "--asr_train_config",
            str(config),
            "--asr_model_file",
            str(weights),
            "--outdir",
            str(out),
            "--format",
            "torchscript",
            "--int8",
        ]
    )
    assert info["files"] == {"int8": "encoder.int8.onnx", "torchscript": "encoder.pt"}
    assert uint8_im2cols(out / "encoder.int8.onnx") == 1  # the int8 form
    assert not (out / "encoder.float.onnx").exists()


def test_cer_cli_decodes_float_and_int8(tmp_path, tiny_data):
    _, config, weights = _asr_model_dir(tmp_path)
    report = main(
        [
            "--asr_train_config",
            str(config),
            "--asr_model_file",
            str(weights),
            "--data_dir",
            str(tiny_data),
            "--out",
            str(tmp_path / "cer"),
            "--max_utts",
            "3",
            "--beam_size",
            "2",
        ]
    )
    written = json.loads((tmp_path / "cer" / "int8_cer.json").read_text())
    assert written["utterances"] == 3 == len(written["hyps"]["int8"])
    assert (written["beam_size"], written["ctc_weight"]) == (2, 0.3)  # as decoded
    assert written["cer_diff"] == pytest.approx(
        written["cer_int8"] - written["cer_float"], abs=0.011
    )
    assert report["cer_float"] >= 0 and np.isfinite(report["cer_int8"])


def test_export_cli_streaming_onnx_int8(tmp_path):
    """``--format onnx onnx_stream --int8`` of a streaming model: the full forward
    under its chunk mask, the fixed-cache chunk graph (checked at export) and the
    int8 copy of each; the int8 chunk graph streams close to the float encoder."""
    model, config, weights = _asr_model_dir(
        tmp_path, causal=True, chunk_size=4, left_chunks=2
    )
    argv = ["--asr_train_config", str(config), "--asr_model_file", str(weights)]
    out = tmp_path / "out"
    formats = ["--format", "onnx", "onnx_stream", "--int8"]
    info = export_main([*argv, "--outdir", str(out), *formats])
    assert info["files"] == {
        "onnx": "encoder.onnx",  # the chunk-masked full forward exports too
        "int8": "encoder.int8.onnx",
        "onnx_stream": "encoder_stream.onnx",
        "onnx_stream_int8": "encoder_stream.int8.onnx",
    }
    stream_info = json.loads((out / "encoder.json").read_text())["onnx_streaming"]
    assert stream_info["inputs"]["chunk"] == [1, 19, FEATS]
    assert stream_info["inputs"]["att_cache"] == [2, 4, 8, 16]
    assert uint8_im2cols(out / "encoder_stream.int8.onnx") == 1  # the int8 form
    assert "MatMulInteger" not in ops(out / "encoder_stream.onnx")
    xs, _ = batch([120])
    with torch.no_grad():
        ref = encode_chunk_by_chunk(fuse(model.encoder), xs, 4, 2)[:, :28]
    for name, low, high in (
        ("encoder_stream", 0, 1e-4),
        ("encoder_stream.int8", 1e-4, 0.25),
    ):
        ys = OnnxStream(onnx_session(out / f"{name}.onnx"), 4, 7).encode(xs)[:, :28]
        assert low <= float((ys - ref).norm() / ref.norm()) < high, name
    with pytest.raises(SystemExit, match="--left_chunks .* must be >= 1"):
        export_main(
            [
                *argv,
                "--outdir",
                str(out),
                "--format",
                "onnx_stream",
                "--left_chunks",
                "-1",
            ]
        )
