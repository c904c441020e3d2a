"""Batching token-id rows for training and reference scoring.

Training and the reference pass (reference.py) both go through these two functions, so the policy and the frozen
reference see identical tensors and DPO's loss is exactly log(2) at step 0. Rows arrive with exactly the tokens
to score: nothing (EOS included) is appended here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def truncate_left(ids: Sequence[int], mask: Sequence[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the last `max_len` tokens: the compared step sits at the end, and the prefix nearest it matters most."""
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length ({len(ids)} != {len(mask)})")
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    start = max(0, len(ids) - max_len)
    return list(ids[start:]), list(mask[start:])


def pad_sequences(
    seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest one: (input_ids, attention_mask, loss_mask), all int64 [batch, length].

    Right padding keeps every real token at the position it has unpadded, so a row's logits do not depend on
    which other rows share its batch.
    """
    if len(seqs) != len(masks):
        raise ValueError(f"{len(seqs)} sequences but {len(masks)} masks")
    if not seqs:
        raise ValueError("pad_sequences needs at least one row")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(seqs, masks)):
        if len(seq) != len(mask):
            raise ValueError(f"row {row}: {len(seq)} ids but {len(mask)} mask entries")
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, :n] = 1
        loss_mask[row, :n] = torch.as_tensor(mask, dtype=torch.long)
    return input_ids, attention, loss_mask


def pack_lines(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows (by index) grouped into lines of at most `width` tokens, first fit by decreasing length: with
    `width` the longest row's length, the packed batch is never wider than the padded one and has fewer
    rows."""
    if any(n > width for n in lengths):
        raise ValueError(f"a row is longer than the line width {width}")
    lines: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        line = next((k for k, free in enumerate(room) if free >= lengths[row]), None)
        if line is None:
            lines.append([])
            room.append(width)
            line = len(lines) - 1
        lines[line].append(row)
        room[line] -= lengths[row]
    return lines
