"""Batching token-id rows for training and reference scoring.

Training and the reference pass (reference.py) both go through `truncate_left` and `pad_sequences`, so the policy
and the frozen reference see identical tensors and DPO's loss is exactly log(2) at step 0 (with
`train.share_prefix`, equal up to rounding: the training side then runs each pair's prefix once,
`share_prefix_layout`). Rows arrive with exactly the tokens
to score: nothing (EOS included) is appended here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


PREFIX, CHOSEN, REJECTED = 0, 1, 2
"""Which part of a shared-prefix pair sequence a token is (`SharedPrefixLayout.branch`)."""


@dataclass
class SharedPrefixLayout:
    """A pair batch laid out with each pair's common prefix once: the lines to run, and where each scored token
    of the padded (B, T) rows reads its log-prob from.

    `unit` numbers the pair a token belongs to (-1: padding) and `branch` says which part of it (PREFIX,
    CHOSEN, REJECTED); `sources` (line, column) is the hidden state that predicts `targets`, and `rows` (row,
    column) where that log-prob goes in the (B, T-1) layout of the unshared path.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    unit: torch.Tensor
    branch: torch.Tensor
    sources: tuple[torch.Tensor, torch.Tensor]
    targets: torch.Tensor
    rows: tuple[torch.Tensor, torch.Tensor]

    def attention_mask(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """(lines, 1, W, W): a token sees the earlier tokens of its own pair, except that a rejected token never
        sees a chosen one. `kind` "bool": True where it may attend; "additive": 0 there, dtype's minimum
        elsewhere. Padding sees padding, so no row of the mask is empty."""
        width = self.ids.shape[1]
        earlier = torch.ones((width, width), dtype=torch.bool, device=self.ids.device).tril()
        same = self.unit[:, :, None] == self.unit[:, None, :]
        crossed = (self.branch[:, :, None] == REJECTED) & (self.branch[:, None, :] == CHOSEN)
        allowed = (same & earlier & ~crossed)[:, None]
        if kind == "bool":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    n = min(len(a), len(b))
    return int((a[:n] == b[:n]).long().cumprod(0).sum())


def share_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        loss_mask: torch.Tensor) -> SharedPrefixLayout:
    """Right-padded pair rows (row i chosen, row n + i rejected) as pair sequences packed into lines: prefix,
    chosen continuation, rejected continuation, both continuations at the positions after the prefix. The
    prefix stops one token short of the shorter side, so each side keeps a token of its own."""
    n, odd = divmod(input_ids.shape[0], 2)
    if odd:
        raise ValueError(f"a pair batch has an even number of rows, not {input_ids.shape[0]}")
    device = input_ids.device
    lengths = attention_mask.sum(-1).tolist()
    limits = [max(0, min(lengths[i], lengths[n + i]) - 1) for i in range(n)]
    prefixes = [common_prefix(input_ids[i, :limits[i]], input_ids[n + i, :limits[i]]) for i in range(n)]
    units = [lengths[i] + lengths[n + i] - prefixes[i] for i in range(n)]
    lines = pack_lines(units, max(units))
    shape = (len(lines), max(units))
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    positions = torch.zeros(shape, dtype=torch.long, device=device)
    unit = torch.full(shape, -1, dtype=torch.long, device=device)
    branch = torch.full(shape, PREFIX, dtype=torch.long, device=device)
    parts: dict[str, list[torch.Tensor]] = {"line": [], "column": [], "target": [], "row": [], "row_column": []}
    for k, members in enumerate(lines):
        start = 0
        for i in members:
            p, c, r = prefixes[i], lengths[i], lengths[n + i]
            end = start + c + r - p
            ids[k, start:start + c], ids[k, start + c:end] = input_ids[i, :c], input_ids[n + i, p:r]
            positions[k, start:start + c] = torch.arange(c, device=device)
            positions[k, start + c:end] = torch.arange(p, r, device=device)
            unit[k, start:end] = i
            branch[k, start + p:start + c], branch[k, start + c:end] = CHOSEN, REJECTED
            columns = {i: start + torch.arange(c, device=device),
                       n + i: torch.cat([start + torch.arange(p, device=device),
                                         start + c + torch.arange(r - p, device=device)])}
            for row, column in columns.items():
                t = torch.arange(1, lengths[row], device=device)[loss_mask[row, 1:lengths[row]].bool()]
                parts["line"].append(torch.full_like(t, k))
                parts["column"].append(column[t - 1])  # token t is predicted by the state at token t - 1
                parts["target"].append(input_ids[row, t])
                parts["row"].append(torch.full_like(t, row))
                parts["row_column"].append(t - 1)
            start = end
    cat = {name: torch.cat(values) for name, values in parts.items()}
    return SharedPrefixLayout(ids, positions, unit, branch, (cat["line"], cat["column"]), cat["target"],
                              (cat["row"], cat["row_column"]))
