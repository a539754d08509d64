"""Export of the fused encoder: ONNX (onnxruntime) and TorchScript match PyTorch on
other lengths than the traced one; training mode is refused; the CLI works on an
ESPnet ASR model built by ASRTask."""

import contextlib
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import FEATS, TINY, asr_config, batch, make_encoder, warm_up
from espnet2.tasks.asr import ASRTask

from espnet_fusionformer import fuse
from espnet_fusionformer.export import (
    OnnxStream,
    check_onnx_stream,
    export_onnx,
    export_onnx_stream,
    export_torchscript,
    main,
    onnx_session,
)
from espnet_fusionformer.streaming import encode_chunk_by_chunk

try:
    import onnxruntime as ort
except ImportError:  # no onnxruntime wheel installs next to espnet 202506's numpy
    ort = None
needs_ort = pytest.mark.skipif(ort is None, reason="onnxruntime is not installed")

# different time lengths and batch sizes than the traced example (padded and not)
LENGTHS = [[90, 61], [143], [40, 40, 25]]


@pytest.fixture(scope="module")
def encoder():
    return warm_up(make_encoder())


def reference(encoder, xs, ilens):
    with torch.no_grad():
        ys, olens = fuse(encoder).encode(xs, ilens)
    return ys, olens


def assert_close(encoder, run):
    for i, lengths in enumerate(LENGTHS):
        xs, ilens = batch(lengths, seed=i)
        ref, ref_lens = reference(encoder, xs, ilens)
        ys, olens = run(xs, ilens)
        assert ys.shape == ref.shape
        np.testing.assert_array_equal(np.asarray(olens), ref_lens.numpy())
        for b, n in enumerate(ref_lens.tolist()):
            np.testing.assert_allclose(ys[b, :n], ref[b, :n].numpy(), atol=1e-4)


@needs_ort
def test_onnx_matches_pytorch_on_other_lengths(encoder, tmp_path):
    path = export_onnx(encoder, tmp_path / "encoder.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    assert inputs == ["feats", "feats_lengths"]
    assert session.get_inputs()[0].shape[:2] == ["batch", "time"]

    def run(xs, ilens):
        return session.run(None, {"feats": xs.numpy(), "feats_lengths": ilens.numpy()})

    assert_close(encoder, run)
    # the encoder itself is left as it was: unfused, in eval mode
    assert not encoder.fused and not encoder.training
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in encoder.modules())


def weight_inputs(path):
    """Input features of every MatMul/Gemm with a constant weight in ``path``."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in inits:
            dims = inits[node.input[1]]
            trans = any(a.name == "transB" and a.i for a in node.attribute)
            out.append(dims[1] if trans else dims[0])
    return out


@needs_ort
@pytest.mark.parametrize("im2col", [False, True], ids=["float-form", "im2col-form"])
@pytest.mark.parametrize("input_layer", ["conv2d", "conv2d2", "conv2d6", "conv2d8"])
def test_onnx_subsampling_convs_as_matmuls_match_pytorch(input_layer, im2col, tmp_path):
    # the subsampling convs export as MatMuls: in float the first two by taps
    # (one matmul per tap of the second conv), for int8 as im2col + one MatMul each
    from espnet_fusionformer.subsampling import SUBSAMPLING, im2col_export

    encoder = warm_up(make_encoder(input_layer=input_layer))
    with im2col_export() if im2col else contextlib.nullcontext():
        path = export_onnx(encoder, tmp_path / "encoder.onnx")
    import onnx

    convs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert len(convs) == TINY["num_blocks"]  # the depthwise convs only
    (k1, _), (k2, _), *rest = SUBSAMPLING[input_layer]
    inputs = weight_inputs(path)
    channels = TINY["output_size"]
    # the first conv over k1 x k1 patches: once, or once per tap of the second
    assert inputs.count(k1 * k1) == (1 if im2col else k2 * k2)
    # the inner convs over their k x k x channels patches (the second: not in float)
    im2cols = [k * k * channels for k, _ in ([(k2, 0)] if im2col else []) + rest]
    patch_sizes = {k * k * channels for k, _ in SUBSAMPLING[input_layer]}
    assert [n for n in inputs if n in patch_sizes] == im2cols
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(xs, ilens):
        return session.run(None, {"feats": xs.numpy(), "feats_lengths": ilens.numpy()})

    assert_close(encoder, run)


def test_torchscript_matches_pytorch_on_other_lengths(encoder, tmp_path):
    path = export_torchscript(encoder, tmp_path / "encoder.pt")
    module = torch.jit.load(str(path))

    def run(xs, ilens):
        with torch.no_grad():
            ys, olens = module(xs, ilens)
        return ys.numpy(), olens.numpy()

    assert_close(encoder, run)


def test_an_already_fused_encoder_exports_too(encoder, tmp_path):
    path = export_torchscript(fuse(encoder), tmp_path / "fused.pt")
    assert path.exists()


@pytest.mark.parametrize("export", [export_onnx, export_torchscript])
def test_training_mode_is_refused(export, tmp_path):
    encoder = make_encoder().train()
    with pytest.raises(RuntimeError, match="training mode.*eval"):
        export(encoder, tmp_path / "encoder.bin")
    encoder.eval()
    encoder.encoders[0].train()  # one submodule left in training mode
    with pytest.raises(RuntimeError, match="training mode"):
        export(encoder, tmp_path / "encoder.bin")
    assert not (tmp_path / "encoder.bin").exists()


def test_only_fusionformer_encoders(tmp_path):
    with pytest.raises(TypeError, match="FusionFormerEncoder"):
        export_onnx(torch.nn.Linear(2, 2).eval(), tmp_path / "x.onnx")


def test_cli_exports_an_asrtask_model(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(asr_config()))
    args = ASRTask.get_parser().parse_args(["--config", str(config)])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    warm_up(model.encoder)
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), exp / "valid.acc.ave.pth")

    out = tmp_path / "exported"
    info = main(
        [
            "--asr_train_config",
            str(exp / "config.yaml"),
            "--asr_model_file",
            str(exp / "valid.acc.ave.pth"),
            "--outdir",
            str(out),
        ]
    )
    written = json.loads((out / "encoder.json").read_text())
    assert written == json.loads(json.dumps(info, default=str))
    assert written["input_size"] == FEATS
    assert written["output_size"] == TINY["output_size"]
    assert written["subsampling"]["input_layer"] == "conv2d"
    assert written["subsampling"]["factor"] == 4
    assert written["max_output_frames"] >= 5000
    assert written["files"] == {"onnx": "encoder.onnx", "torchscript": "encoder.pt"}

    encoder = model.encoder.eval()
    scripted = torch.jit.load(str(out / "encoder.pt"))
    xs, ilens = batch([80, 57], seed=5)
    ref, ref_lens = reference(encoder, xs, ilens)
    with torch.no_grad():
        ys_ts, olens_ts = scripted(xs, ilens)
    outputs = [(ys_ts.numpy(), olens_ts.numpy())]
    if ort is not None:  # (without it, the file is written but not run)
        session = ort.InferenceSession(
            str(out / "encoder.onnx"), providers=["CPUExecutionProvider"]
        )
        feeds = {"feats": xs.numpy(), "feats_lengths": ilens.numpy()}
        outputs.append(tuple(session.run(None, feeds)))
    for out_ys, out_lens in outputs:
        np.testing.assert_array_equal(out_lens, ref_lens.numpy())
        for b, n in enumerate(ref_lens.tolist()):
            np.testing.assert_allclose(out_ys[b, :n], ref[b, :n].numpy(), atol=1e-4)


def test_cli_only_onnx(tmp_path):
    """``--format onnx`` writes no TorchScript file (``--no-verify``: no check)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(asr_config()))
    args = ASRTask.get_parser().parse_args(["--config", str(config)])
    model = ASRTask.build_model(args)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    main(
        [
            "--asr_train_config",
            str(tmp_path / "train.yaml"),
            "--asr_model_file",
            str(tmp_path / "model.pth"),
            "--outdir",
            str(tmp_path / "out"),
            "--format",
            "onnx",
            "--no-verify",
        ]
    )
    assert (tmp_path / "out" / "encoder.onnx").exists()
    assert not (tmp_path / "out" / "encoder.pt").exists()


def _saved_asr_model(tmp_path, **encoder_conf):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(asr_config(**encoder_conf)))
    args = ASRTask.get_parser().parse_args(["--config", str(config)])
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    warm_up(model.encoder)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    return model, [
        "--asr_train_config",
        str(tmp_path / "train.yaml"),
        "--asr_model_file",
        str(tmp_path / "model.pth"),
        "--outdir",
        str(tmp_path / "out"),
    ]


def test_cli_streaming_torchscript(tmp_path):
    """``--format torchscript_stream`` writes the scripted ``forward_chunk``
    (checked at export), which runs chunk by chunk like the eager encoder."""
    model, argv = _saved_asr_model(tmp_path, causal=True, chunk_size=4, left_chunks=2)
    info = main([*argv, "--format", "torchscript_stream"])
    out = tmp_path / "out"
    assert info["files"] == {"torchscript_stream": "encoder_stream.pt"}
    assert not (out / "encoder.pt").exists() and not (out / "encoder.onnx").exists()
    stream = json.loads((out / "encoder.json").read_text())["streaming"]
    assert stream["chunk_size"] == 4 and stream["left_chunks"] == 2
    assert stream["subsampling_rate"] == 4 and stream["right_context"] == 6
    assert stream["cnn_cache"] == [2, 1, 6, TINY["output_size"]]

    module = torch.jit.load(str(out / "encoder_stream.pt"))
    encoder = fuse(model.encoder.eval())
    xs, _ = batch([100], seed=3)
    empty = torch.zeros(0, 0, 0, 0)
    att, cnn, ref_att, ref_cnn = empty, empty, empty, empty
    offset = 0
    for start in range(0, 100 - 7 + 1, 16):  # chunks of 4 output frames
        chunk = xs[:, start : start + 19]
        with torch.no_grad():
            ys, att, cnn = module.forward_chunk(chunk, offset, 8, att, cnn)
            ref, ref_att, ref_cnn = encoder.forward_chunk(
                chunk, offset, 8, ref_att, ref_cnn
            )
        np.testing.assert_allclose(ys.numpy(), ref.numpy(), atol=1e-4)
        offset += ys.size(1)
    np.testing.assert_allclose(att.numpy(), ref_att.numpy(), atol=1e-4)
    np.testing.assert_allclose(cnn.numpy(), ref_cnn.numpy(), atol=1e-4)


def test_cli_streaming_torchscript_refuses_a_full_context_model(tmp_path):
    _, argv = _saved_asr_model(tmp_path)  # causal: false
    with pytest.raises(SystemExit, match="torchscript_stream.*causal"):
        main([*argv, "--format", "torchscript_stream"])
    assert not (tmp_path / "out" / "encoder_stream.pt").exists()


# -- streaming ONNX (fixed-size caches) --------------------------------------------
@needs_ort
def test_onnx_stream_runs_chunk_by_chunk_like_eager(tmp_path):
    """The fixed-cache graph equals the eager ``forward_chunk`` window by window
    (checked at export); ``OnnxStream.encode`` gives the chunk-by-chunk encoding of
    a whole utterance (the zero-padded last window aside); the check catches a
    graph that drifts from eager."""
    encoder = warm_up(make_encoder(causal=True))
    path = export_onnx_stream(encoder, tmp_path / "stream.onnx", 4, 2)
    session = onnx_session(path)
    names = [i.name for i in session.get_inputs()]
    assert names == ["chunk", "offset", "att_cache", "cnn_cache"]
    fused = fuse(encoder)
    assert check_onnx_stream(fused, session, 4, 2) < 1e-4
    stream = OnnxStream(session, 4, 7)
    assert stream.window == 19 and stream.chunk_size == 4
    xs, _ = batch([130], seed=4)  # 31 output frames: 7 full chunks + 3 frames
    with torch.no_grad():
        ref = encode_chunk_by_chunk(fused, xs, 4, 2)
    ys = stream.encode(xs)
    assert ys.shape == ref.shape
    np.testing.assert_allclose(ys[:, :28].numpy(), ref[:, :28].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="windows of 19 input frames"):
        stream(xs[:, :18])
    with torch.no_grad():
        fused.encoders[1].feed_forward.w_2.layer.weight.add_(1e-2)
    with pytest.raises(RuntimeError, match="differs from eager forward_chunk"):
        check_onnx_stream(fused, session, 4, 2)


def test_onnx_stream_refuses_a_full_context_model(tmp_path):
    with pytest.raises(ValueError, match="causal convolution"):
        export_onnx_stream(warm_up(make_encoder()), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="left_chunks must be >= 1"):
        export_onnx_stream(
            warm_up(make_encoder(causal=True)), tmp_path / "x.onnx", 4, -1
        )
    assert not (tmp_path / "x.onnx").exists()
