"""A gated LoRA adapter at evaluation time: each row's LoRA update is scaled by its prompt's gate.

A gate is a function of the prompt alone (:data:`GateFn`; e.g. a concept score read from the base
model, :class:`training.containment.ConceptGate`). It cannot be merged into the weights, so the
adapter stays unmerged and every LoRA layer's update of row ``b`` is multiplied by ``g[b]``
(:func:`interp.adapter.lora_row_scale`). Which prompts the rows of a forward hold is said by the
code that batches them:

* :func:`row_gated_adapter` (the model change) installs the scaling for a gate function;
* :func:`gate_rows` (the measuring side) computes the gates of a batch of left-padded prompts and
  applies them to every forward inside it: the prompt's forward, each decode step from its KV
  cache, a teacher-forced continuation of it;
* :func:`select_gate_rows` follows rows that leave the batch (generation drops finished rows).

A forward under a gated adapter outside :func:`gate_rows`, or whose rows do not match it, raises
:class:`UngatedForwardError`: a path that cannot carry a per-row gate fails, it never runs ungated.
A shared-prefix KV cache cannot carry one either (the prefix's keys and values depend on each
row's gate, so one cache cannot serve rows with different gates): callers ask :func:`gate_active`
and run uncached, which costs what the cache would save and is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.adapter import lora_row_scale
from interp.loading import LoadedModel

__all__ = ["GateFn", "UngatedForwardError", "row_gated_adapter", "gate_active", "gate_rows", "select_gate_rows"]

GateFn = Callable[[Tensor, Tensor], Tensor]
"""``gate(input_ids, attention_mask) -> (batch,)``: the gate of each row of a left-padded batch of
prompts (each row's prompt ends at the last position), computed without the gated adapter."""

_STATE = "_emalab_row_gate"


class UngatedForwardError(RuntimeError):
    """A forward ran under a gated adapter without the gates of its rows."""


@dataclass
class _Gate:
    fn: GateFn
    rows: Tensor | None = None
    """Gates of the rows the forwards inside :func:`gate_rows` run; ``None`` outside."""

    def factors(self, n_rows: int) -> Tensor:
        if self.rows is None:
            raise UngatedForwardError(
                "a forward under a gated adapter ran outside interp.gating.gate_rows: this path cannot carry a "
                "per-row gate (batch its prompts inside gate_rows, or evaluate without the gate)")
        if n_rows != self.rows.shape[0]:
            raise UngatedForwardError(f"a forward of {n_rows} rows under the gates of {self.rows.shape[0]} rows; "
                                      "rows that leave the batch must go through select_gate_rows")
        return self.rows


def _state(lm: LoadedModel) -> _Gate | None:
    return getattr(lm.model, _STATE, None)


def gate_active(lm: LoadedModel) -> bool:
    """Whether ``lm`` runs under :func:`row_gated_adapter` (then a shared-prefix cache is off)."""
    return _state(lm) is not None


@contextmanager
def row_gated_adapter(lm: LoadedModel, gate: GateFn) -> Iterator[LoadedModel]:
    """Within the block, each LoRA update of ``lm``'s (unmerged) adapter is scaled per row by the
    gate of the row's prompt; forwards must run inside :func:`gate_rows`. Restored on exit.

    Raises:
        ValueError: the model has no unmerged LoRA layer (load the adapter, do not merge it).
        RuntimeError: a gated adapter is already active on ``lm``.
    """
    if gate_active(lm):
        raise RuntimeError("a gated adapter is already active on this model")
    state = _Gate(gate)
    model = lm.model
    with lora_row_scale(model, state.factors):
        setattr(model, _STATE, state)
        try:
            yield lm
        finally:
            delattr(model, _STATE)


@contextmanager
def gate_rows(
    lm: LoadedModel, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"]
) -> Iterator[Float[Tensor, " batch"] | None]:
    """The forwards inside the block run the rows of these left-padded prompts (in this order) and
    are gated by them; yields the gates, or ``None`` (and changes nothing) without a gated adapter.
    Nested blocks restore the outer rows on exit."""
    state = _state(lm)
    if state is None:
        yield None
        return
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("gate_rows needs left-padded prompts: every row's prompt ends at the last position")
    g = state.fn(input_ids, attention_mask).detach()
    if g.shape != (input_ids.shape[0],) or not bool(torch.isfinite(g).all()):
        raise ValueError(f"a gate must give one finite value per row ({input_ids.shape[0]}), got {tuple(g.shape)}")
    before = state.rows
    state.rows = g
    try:
        yield g
    finally:
        state.rows = before


def select_gate_rows(lm: LoadedModel, keep: Int[Tensor, " kept"]) -> None:
    """Keep only rows ``keep`` of the current :func:`gate_rows` (the rows still decoding); a no-op
    without a gated adapter."""
    state = _state(lm)
    if state is None:
        return
    if state.rows is None:
        raise UngatedForwardError("select_gate_rows outside gate_rows: there are no gated rows to select")
    state.rows = state.rows[keep.to(state.rows.device)]
