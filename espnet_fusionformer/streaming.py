"""Chunk-based streaming: attention masks, U2 dynamic chunks, chunk-by-chunk encoding.

A chunk of ``C`` output frames attends to itself and to ``left_chunks`` earlier
chunks (all of them for ``-1``). Training with a random chunk size per batch
(``dynamic_chunk_training``, WeNet's U2 recipe) gives one model that decodes both
with full context and chunk by chunk.
"""

import random
from typing import Tuple

import torch


def chunk_mask(
    size: int, chunk_size: int, left_chunks: int, device: torch.device
) -> torch.Tensor:
    """``(size, size)`` bool: True where query frame ``i`` may attend key ``j``."""
    chunk = torch.arange(size, device=device) // chunk_size
    allowed = chunk[None, :] <= chunk[:, None]
    if left_chunks >= 0:
        allowed = allowed & (chunk[None, :] >= chunk[:, None] - left_chunks)
    return allowed


def sample_chunk(
    num_frames: int, max_chunk: int, max_left_chunks: int, dynamic_left: bool
) -> Tuple[int, int]:
    """U2's dynamic chunk: half the batches see full context, the others a chunk
    of 1..``max_chunk`` frames (and, with ``dynamic_left``, a random left context).

    Returns:
        ``(chunk_size, left_chunks)``; ``chunk_size == 0`` means full context.
    """
    draw = random.randint(1, max(num_frames, 1))
    if draw > num_frames // 2:
        return 0, -1
    chunk_size = draw % max_chunk + 1
    left = -1
    if dynamic_left:
        left = random.randint(0, max(max_left_chunks, 0))
    return chunk_size, left


def encode_chunk_by_chunk(
    encoder, xs: torch.Tensor, chunk_size: int, left_chunks: int = -1, ctc=None
) -> torch.Tensor:
    """Encode one utterance ``(1, T, F)`` chunk by chunk with ``forward_chunk``.

    The input windows overlap by the subsampling's receptive field, so every
    output frame is computed from the same input frames as in the full forward.
    ``ctc``: the model's CTC, for ``interctc_use_conditioning``.

    Returns:
        ``(1, T', D)``, equal to the full forward under the same chunk mask.
    """
    rate, context = encoder.embed.rate(), encoder.embed.min_input_length()
    window, stride = (chunk_size - 1) * rate + context, chunk_size * rate
    required = chunk_size * left_chunks if left_chunks >= 0 else -1
    att_cache = cnn_cache = torch.zeros(0, 0, 0, 0)
    outputs, offset = [], 0
    for start in range(0, xs.size(1) - context + 1, stride):
        ys, att_cache, cnn_cache = encoder.forward_chunk(
            xs[:, start : start + window], offset, required, att_cache, cnn_cache, ctc
        )
        outputs.append(ys)
        offset += ys.size(1)
    return torch.cat(outputs, dim=1)
