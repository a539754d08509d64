"""``python -m _capture_model OUT ASR_TRAIN_ARGS...``: run ESPnet's unchanged
``asr_train`` and save, per rank, the state_dict of the model it trained.

Instrumentation only: ``ASRTask.build_model`` is wrapped to keep a reference to the
real model it builds; training, DDP and checkpointing are ESPnet's.
"""

import os
import sys

import torch
from espnet2.tasks.asr import ASRTask

built = []
_build_model = ASRTask.build_model.__func__


def _keep(cls, args):
    model = _build_model(cls, args)
    built.append(model)
    return model


if __name__ == "__main__":
    out = sys.argv[1]
    ASRTask.build_model = classmethod(_keep)
    from espnet2.bin.asr_train import main

    main(sys.argv[2:])
    rank = os.environ.get("RANK", "0")
    torch.save(built[0].state_dict(), os.path.join(out, f"rank{rank}.pth"))
