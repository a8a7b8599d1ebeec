"""Row chunks and vocabulary tiles shared by the chunked PyTorch twins.

``torch_sdft`` (self-distillation) and ``torch_linear_ce`` (cross-entropy) never hold [N, V]
logits: tokens are cut into row chunks of ``R`` rows and the vocabulary into tiles of ``Vt``
columns, per-token statistics run over the tiles like flash attention's running max and sum,
and a weight that needs a gradient gets it from a second sweep that recomputes the logit
tiles. This module holds what both twins do the same way: the tile sizes for a memory budget,
the dtype the statistics live in, one logit tile, one step of the online softmax, and the
second sweep that turns tiles of dLoss/dz into dh, dW and dbias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

# ``memory_budget_mb`` of the API defaults to None: each path's own default. The twins' tiles
# keep TILE_BUDGET_MB whatever N and V are (taller or wider tiles make their GEMMs no faster);
# the 3-GEMM path's chunks grow with the inputs (``gemm_sdft.default_memory_budget_mb``).
DEFAULT_MEMORY_BUDGET_MB = None
TILE_BUDGET_MB = 32
# Live fp32 [R, Vt] tiles at the peak of a vocabulary step (both logit tiles stacked, their
# exponentials, and temporaries of the gradient formula).
_LIVE_TILES = 8
_MAX_ROWS = 1024  # larger row chunks give no faster GEMMs on CPU and only cost memory
_MIN_VOCAB_TILE = 128


def tile_sizes(num_tokens: int, vocab_size: int, memory_budget_mb: float | None) -> tuple[int, int]:
    """Rows per chunk and vocabulary columns per tile for a memory budget (in MiB; None: 32)."""
    if memory_budget_mb is None:
        memory_budget_mb = TILE_BUDGET_MB
    budget_elems = max(int(memory_budget_mb * 2**20) // (4 * _LIVE_TILES), 1)
    # Prefer tall row chunks (each chunk reads all of W once), but keep tiles >= _MIN_VOCAB_TILE wide.
    rows = max(1, min(num_tokens, _MAX_ROWS, budget_elems // _MIN_VOCAB_TILE))
    vocab_tile = max(1, min(vocab_size, budget_elems // rows))
    return rows, vocab_tile


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits and statistics: fp32 for fp32/bf16/fp16 inputs, float64 stays float64
    (tests and gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def spans(total: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks of ``step`` covering range(total), the last one short."""
    for start in range(0, total, step):
        yield start, min(start + step, total)


def logit_tile(
    hidden: torch.Tensor,  # [R, D] in the compute dtype
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    v0: int,
    v1: int,
    inv_tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, Vt] logits (W[v0:v1] h + b[v0:v1]) / tau in the row chunk's dtype, and that W tile."""
    w_tile = weight[v0:v1].to(hidden.dtype)  # [Vt, D]; a view when the dtypes already agree
    if bias is None:
        z = hidden @ w_tile.T
    else:
        z = torch.addmm(bias[v0:v1].to(hidden.dtype), hidden, w_tile.T)
    if inv_tau != 1.0:
        z.mul_(inv_tau)
    return z, w_tile


def online_softmax_update(
    running_max: torch.Tensor,  # [R] max of the logits seen so far (-inf before the first tile)
    running_sum: torch.Tensor,  # [R] sum exp(z - running_max) so far
    logits: torch.Tensor,  # [R, Vt] the next tile
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One vocabulary tile of the running max / sum: (new max, rescale, exp tile, new sum).

    When the max moves from m to m', every running sum over earlier tiles scales by
    ``rescale = exp(m - m')`` (0 on the first tile: exp(-inf)); ``exp tile = exp(z - m')`` is
    returned for the callers' own running sums.
    """
    new_max = torch.maximum(running_max, logits.max(dim=1).values)
    rescale = torch.exp(running_max - new_max)
    exp_tile = torch.exp(logits - new_max[:, None])
    return new_max, rescale, exp_tile, running_sum * rescale + exp_tile.sum(1)


def scale_rows(
    grad_rows: torch.Tensor,  # [N, D] d(per-token loss n)/dh_n, formed in the forward sweep
    grad_loss: torch.Tensor,  # [N] incoming dLoss/d(per-token loss)
    out_dtype: torch.dtype,
) -> torch.Tensor:  # [N, D]
    """The backward of a twin whose dh was formed in the forward: scale row n by grad_loss[n]."""
    return (grad_rows * grad_loss.to(grad_rows.dtype)[:, None]).to(out_dtype)


# Tiles of dLoss/dz for one row chunk: called with (r0, r1, hidden chunk in the compute dtype),
# yields (v0, v1, g [R, Vt], W[v0:v1] in the compute dtype) for every vocabulary tile.
TileGrads = Callable[[int, int, torch.Tensor], Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]]


def recompute_grads(
    hidden: torch.Tensor,  # [N, D] the rows whose logits are z = (W h + b) / tau
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    grad_loss: torch.Tensor,  # [N] incoming dLoss/d(per-token loss)
    inv_tau: float,
    rows: int,
    needs: tuple[bool, bool, bool],  # (dh, dW, dbias)
    tile_grads: TileGrads,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dh, dW, dbias), each None unless asked for, by a second sweep over the vocabulary.

    With g = dLoss_n/dz for one [R, Vt] tile and r = grad_loss / tau per row (the 1/tau of
    dz/dh and dz/dW folded into the row scale):
        dh[rows] += (r g) @ W[tile],  dW[tile] += (r g)^T @ h[rows],  dbias[tile] += sum_rows r g.
    Accumulates in the compute dtype; returns each gradient in its input's dtype.
    """
    need_dh, need_dw, need_db = needs
    dtype = compute_dtype(hidden.dtype)
    dh = hidden.new_zeros(hidden.shape, dtype=dtype) if need_dh else None  # [N, D]
    dw = weight.new_zeros(weight.shape, dtype=dtype) if need_dw else None  # [V, D]
    db = weight.new_zeros(weight.shape[0], dtype=dtype) if need_db else None  # [V]
    for r0, r1 in spans(hidden.shape[0], rows):
        hidden_chunk = hidden[r0:r1].to(dtype)  # [R, D]
        row_scale = grad_loss[r0:r1].to(dtype) * inv_tau  # [R]
        for v0, v1, g, w_tile in tile_grads(r0, r1, hidden_chunk):
            g.mul_(row_scale[:, None])  # [R, Vt]
            if dh is not None:
                dh[r0:r1].addmm_(g, w_tile)  # [R, D] += [R, Vt] @ [Vt, D]
            if dw is not None:
                dw[v0:v1].addmm_(g.T, hidden_chunk)  # [Vt, D] += [Vt, R] @ [R, D]
            if db is not None:
                db[v0:v1] += g.sum(0)
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
