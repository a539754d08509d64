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
    gemm_to_matmul,
    main,
    quantize,
    quantize_onnx,
)
from espnet_fusionformer.streaming import encode_chunk_by_chunk  # noqa: E402


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    encoder = warm_up(make_encoder())
    path = export_onnx(encoder, tmp_path_factory.mktemp("onnx") / "encoder.onnx")
    return encoder, path


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


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


def test_int8_file_has_integer_matmuls_and_stays_close(float_onnx, tmp_path):
    encoder, path = float_onnx
    int8 = quantize_onnx(path, tmp_path / "encoder.int8.onnx")
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
    producer = {o: n for n in model.graph.node for o in n.output}
    integer_inputs = [
        producer[n.input[0]].op_type
        for n in model.graph.node
        if n.op_type == "MatMulInteger"
    ]
    assert integer_inputs.count("Concat") == 1
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
    assert "MatMulInteger" in ops(out / "encoder.int8.onnx")
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
    assert "MatMulInteger" in ops(out / "encoder_stream.int8.onnx")
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
