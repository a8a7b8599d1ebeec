"""Packed token streams laid out as prefix trees, and causal attention over them.

The one-pass model packs many sequences (all student rows, or all teacher rows) into one token
stream with no padding. Sequences that begin with the same tokens — the chat template's system
turn, one prompt sampled several times — share rows: the common prefix is computed once, and every
sequence that continues it attends to those rows. This is exact under causal attention, where a
position's hidden state depends only on the tokens up to it; gradients from every sequence that
reads a shared row add up on it.

:class:`PrefixTreeStream` lays a batch out (token ids, positions, the rows that predict each
completion token) and builds its :class:`AttentionPlan` once; :func:`prefix_tree_attention` runs
attention for every layer from that plan: flash-attn varlen on CUDA when installed, else SDPA per
group of equal-shape segments (no padding FLOPs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_varlen_func


# Shorter common prefixes are recomputed per sequence: sharing a handful of tokens saves less
# than the extra attention call of one more segment costs.
MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class Segment:
    """A run of rows computed once: queries at rows [start, start + length).

    ``key_rows`` are the rows its queries attend to, in position order: the rows of the
    segments it continues (its shared prefix), then its own rows, causal over the own part.
    """

    start: int
    length: int
    key_rows: tuple[int, ...]


class PrefixTreeStream:
    """One packed token stream (student or teacher), laid out as a prefix tree.

    Sequences that begin with the same tokens (the chat template's system prompt; the same
    prompt sampled several times) share rows: the common prefix is computed once and every
    sequence that continues it attends to those rows. Exact under causal attention, where a
    position's hidden state depends only on the tokens up to it; gradients from every sequence
    that reads a shared row add up on it. ``min_shared=0`` turns sharing off (one segment per
    sequence, the plain block-diagonal layout).
    """

    def __init__(
        self,
        seqs: list[list[int]],
        prompt_lens: list[int],
        completion_lens: list[int],
        device,
        min_shared: int = MIN_SHARED_PREFIX,
    ):
        tokens: list[int] = []
        positions: list[int] = []
        self.segments: list[Segment] = []
        paths: list[tuple[int, ...]] = [()] * len(seqs)  # the rows of each sequence, position by position

        def add_segment(prefix_rows: tuple[int, ...], seq: list[int], depth: int, length: int):
            start = len(tokens)
            tokens.extend(seq[depth : depth + length])
            positions.extend(range(depth, depth + length))
            rows = prefix_rows + tuple(range(start, start + length))
            self.segments.append(Segment(start, length, rows))
            return rows

        def build(group: list[int], depth: int, prefix_rows: tuple[int, ...]) -> None:
            # Every sequence of `group` starts with the `depth` tokens already laid out at prefix_rows.
            if len(group) == 1 or min_shared <= 0:
                for b in group:
                    rest = len(seqs[b]) - depth
                    paths[b] = add_segment(prefix_rows, seqs[b], depth, rest) if rest > 0 else prefix_rows
                return
            first = seqs[group[0]]
            limit = min(len(seqs[b]) for b in group) - depth
            common = 0
            while common < limit and all(seqs[b][depth + common] == first[depth + common] for b in group):
                common += 1
            if common >= min_shared:
                prefix_rows = add_segment(prefix_rows, first, depth, common)
                depth += common
                common = 0
            # Split where the sequences first differ; each subgroup shares a longer prefix than
            # `group` (or starts a new shared segment), so the recursion ends.
            split = depth + common
            subgroups: dict[int, list[int]] = {}
            for b in group:
                if len(seqs[b]) == split:
                    build([b], depth, prefix_rows)
                else:
                    subgroups.setdefault(seqs[b][split], []).append(b)
            for sub in subgroups.values():
                build(sub, depth, prefix_rows)

        build(list(range(len(seqs))), 0, ())
        self.input_ids = torch.tensor(tokens, dtype=torch.long, device=device)  # [Ns] unique rows
        self.position_ids = torch.tensor(positions, dtype=torch.long, device=device)  # [Ns]
        gather: list[int] = []
        for path, p, c in zip(paths, prompt_lens, completion_lens):
            gather.extend(path[p - 1 : p - 1 + c])
        self.gather_rows = torch.tensor(gather, dtype=torch.long, device=device)  # [N]
        self.attention = AttentionPlan(self.segments, device)


@dataclass(frozen=True)
class AttentionGroup:
    """Segments of one (query, key) length pair: one [G, H, Lq, hd] SDPA call."""

    length: int  # Lq
    key_length: int  # Lk
    count: int  # G
    first: int | None  # start row when the group is G back-to-back segments without a prefix (a view)
    rows: torch.Tensor  # [G*Lq] query rows
    key_rows: torch.Tensor | None  # [G*Lk] key rows (None with `first`)
    mask: torch.Tensor | None  # [Lq, Lk] bottom-right causal; None when Lq == Lk (is_causal)


class AttentionPlan:
    """Index tensors for :func:`prefix_tree_attention`, built once per stream and reused by every
    layer: they depend on the stream's segments only."""

    def __init__(self, segments: list[Segment], device):
        self.num_rows = sum(s.length for s in segments)
        # flash-attn varlen: queries are the rows in order; keys gathered per segment when shared
        lengths = [s.length for s in segments]
        self.shared = any(len(s.key_rows) != s.length for s in segments)
        self.cu_q = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        self.max_q = max(lengths)
        key_lengths = [len(s.key_rows) for s in segments]
        self.cu_k = torch.tensor([0, *itertools.accumulate(key_lengths)], dtype=torch.int32, device=device)
        self.max_k = max(key_lengths)
        self.key_index = (
            torch.tensor([r for s in segments for r in s.key_rows], device=device) if self.shared else None
        )
        # SDPA: segments of equal (query, key) lengths form one batch: no padding, few calls
        by_shape: dict[tuple[int, int], list[Segment]] = {}
        for segment in segments:
            by_shape.setdefault((segment.length, len(segment.key_rows)), []).append(segment)
        self.groups: list[AttentionGroup] = []
        for (length, key_length), group in by_shape.items():
            g, first = len(group), group[0].start
            back_to_back = key_length == length and all(
                s.start == first + i * length for i, s in enumerate(group)
            )
            if back_to_back:
                rows = torch.arange(first, first + g * length, device=device)
                key_rows = None
            else:
                rows = (
                    torch.tensor([s.start for s in group], device=device)[:, None]
                    + torch.arange(length, device=device)
                ).reshape(-1)
                key_rows = torch.tensor([s.key_rows for s in group], device=device).reshape(-1)
            mask = (
                None
                if key_length == length
                else torch.ones(length, key_length, dtype=torch.bool, device=device).tril(key_length - length)
            )
            self.groups.append(
                AttentionGroup(length, key_length, g, first if back_to_back else None, rows, key_rows, mask)
            )
        # One group holds every segment in row order: its output rows are already in order.
        self.inverse = None
        if len(self.groups) > 1:
            self.inverse = torch.empty(self.num_rows, dtype=torch.long, device=device)
            self.inverse[torch.cat([group.rows for group in self.groups])] = torch.arange(
                self.num_rows, device=device
            )


def prefix_tree_attention(
    q: torch.Tensor,  # [N, Hq, hd]
    k: torch.Tensor,  # [N, Hkv, hd]
    v: torch.Tensor,  # [N, Hkv, hd]
    plan: AttentionPlan,  # of the stream's segments (in row order, covering the N rows)
    scaling: float,
) -> torch.Tensor:  # [N, Hq, hd]
    """Causal attention over a packed prefix tree (see :class:`PrefixTreeStream`).

    Each segment's queries attend to its shared-prefix rows and causally to its own rows, i.e.
    causal attention aligned to the bottom right of its [length, len(key_rows)] block. With no
    shared prefixes this is block-diagonal causal attention over sequences packed back to back.
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    flash = _flash_attn_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        if plan.shared:  # flash-attn >= 2.1 aligns the causal mask to the bottom right, as needed here
            k, v = k[plan.key_index], v[plan.key_index]
        return flash(
            q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, softmax_scale=scaling, causal=True
        )
    # SDPA's enable_gqa keeps the fused CPU kernel and saves the un-repeated K/V for backward.
    gqa = {"enable_gqa": True} if n_kv_heads != n_heads else {}
    pieces = []
    for group in plan.groups:
        g, length, key_length = group.count, group.length, group.key_length
        if group.first is not None:  # back-to-back segments without a prefix: a view, no gather copy
            qg, kg, vg = (t[group.first : group.first + g * length] for t in (q, k, v))
        else:
            qg, kg, vg = q[group.rows], k[group.key_rows], v[group.key_rows]
        qg = qg.view(g, length, n_heads, -1).transpose(1, 2)  # [G, H, Lq, hd]
        kg = kg.view(g, key_length, n_kv_heads, -1).transpose(1, 2)  # [G, Hkv, Lk, hd]
        vg = vg.view(g, key_length, n_kv_heads, -1).transpose(1, 2)
        if group.mask is None:
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scaling, **gqa)
        else:  # bottom-right causal: query i sees every prefix key and its own keys up to i
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=group.mask, scale=scaling, **gqa)
        pieces.append(out.transpose(1, 2).reshape(g * length, n_heads, -1))  # [G*Lq, H, hd]
    if plan.inverse is None:
        return pieces[0]
    return torch.cat(pieces)[plan.inverse]
