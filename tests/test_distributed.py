"""ESPnet's distributed engine (torchrun, gloo, 2 CPU processes) and resume, through
``espnet2.bin.asr_train``: the training loop, DDP and checkpoints are ESPnet's."""

import shutil

import torch
from conftest import asr_config, asr_train_args, espnet


def close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a
    )


def test_synced_ranks_end_with_identical_weights_and_statistics(tiny_data, tmp_path):
    synced = asr_config(sync_batchnorm=True)["encoder_conf"]
    args = asr_train_args(tmp_path, tiny_data, tmp_path / "asr", encoder_conf=synced)
    espnet(
        "_capture_model",
        str(tmp_path),
        *args,
        "--dist_backend",
        "gloo",
        "--multiprocessing_distributed",
        "false",
        cwd=tmp_path,
        launcher=[shutil.which("torchrun"), "--nproc_per_node", "2"],
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1)]
    stats = [k for k in ranks[0] if k.endswith(("running_mean", "running_var"))]
    assert stats and close(ranks[0], ranks[1], atol=1e-6)
    # the ranks saw different utterances: without cross-rank statistics the
    # running statistics of the two ranks would differ
    initial = torch.load(tmp_path / "asr" / "1epoch.pth")
    assert not close(
        {k: ranks[0][k] for k in stats}, {k: initial[k] for k in stats}, 1e-3
    )


def test_resume_after_an_epoch_ends_where_an_uninterrupted_run_ends(
    tiny_data, tmp_path
):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for exp in (whole, resumed):
        exp.mkdir()
    espnet(
        "espnet2.bin.asr_train",
        *asr_train_args(whole, tiny_data, whole / "asr"),
        cwd=whole,
    )
    first = asr_train_args(resumed, tiny_data, resumed / "asr", max_epoch=1)
    espnet("espnet2.bin.asr_train", *first, cwd=resumed)
    assert not (resumed / "asr" / "2epoch.pth").exists()
    again = asr_train_args(resumed, tiny_data, resumed / "asr")  # max_epoch 2
    espnet("espnet2.bin.asr_train", *again, "--resume", "true", cwd=resumed)
    a = torch.load(whole / "asr" / "2epoch.pth")
    b = torch.load(resumed / "asr" / "2epoch.pth")
    assert close(a, b, atol=1e-5)
    assert not close(a, torch.load(whole / "asr" / "1epoch.pth"), atol=1e-3)
