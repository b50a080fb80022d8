"""The base model's side of the reference retain terms (``retain_mode`` ``kl``, ``repr``, ``direction``),
computed once per run instead of by a no-grad forward of the retain batch at every step.

The base weights never change during a LoRA run and the retain rows are a fixed set, so each row's
reference is a function of (base model, row): :func:`retain_reference` computes it for every retain row
before the loop (adapter disabled, in ``cfg.retain_batch_size`` batches of
:func:`training.collate.collate_rows`, the step's own tokenisation) and keeps, per row and unpadded, only
what the retain loss reads:

* ``kl``: the logits at the positions that predict the row's response tokens, ``[R_i, d_vocab]``;
* ``repr``: the residual stream at the term's layers at every real (non-padding) token, ``[T_i, layer, d_model]``;
* ``direction``: the stream at the term's layers at the last prompt token, ``[layer, d_model]``.

A step re-pads its batch's rows to the batch's shape (:meth:`RetainReference.response_logits`,
:meth:`RetainReference.stream`, :meth:`RetainReference.last_prompt`), by the rows' positions in the
retain set (:attr:`training.collate.TokenBatch.index`).

Memory, in the model's output dtype (``bytes`` = 2 in bf16, 4 in float32), on the host (the accelerator's
memory is unchanged; each step copies over its batch's rows, the size of what the per-step forward made):

* ``kl``: Σ_rows R_i × d_vocab × bytes, R_i ≤ ``max_new_tokens`` response tokens; the largest by far
  (Qwen2.5's 151,936-token vocabulary, 36 rows × 48 tokens in bf16: 0.53 GB);
* ``repr``: Σ_rows T_i × layers × d_model × bytes, T_i prompt + response tokens (36 rows × 100 tokens ×
  3 layers × 1536 in bf16: 33 MB);
* ``direction``: rows × layers × d_model × bytes (kilobytes).

The reference is kept in memory only and recomputed when a run resumes: it costs
``ceil(rows / retain_batch_size)`` no-grad forwards (about as many as a few steps' reference forwards),
while a ``kl`` file would take hundreds of MB per run directory. Recomputing gives the same values a
fresh run computed (same rows, same batches), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.activations import stream_activations
from interp.adapter import check_layers
from interp.loading import LoadedModel, adapter_disabled
from training.collate import TokenBatch, collate_rows
from training.config import UnlearnConfig
from training.containment import Containment, last_prompt_index
from training.dataset import DataSet
from training.losses import response_logits

__all__ = ["REFERENCE_MODES", "RetainReference", "retain_layers", "batches_reference", "retain_reference"]

REFERENCE_MODES = ("kl", "repr", "direction")
"""The retain modes that compare with the base model (and so have a reference to precompute)."""


def retain_layers(lm: LoadedModel, cfg: UnlearnConfig, containment: Containment | None) -> list[int]:
    """The layers the ``repr`` / ``direction`` retain term reads, in :func:`interp.adapter.check_layers`
    order: ``cfg.repr_layers``, else the direction's layers, else (``repr``) every layer."""
    direction = containment.direction if containment is not None else None
    wanted = cfg.repr_layers if cfg.repr_layers is not None or direction is None else direction.layers
    return check_layers(lm.model, wanted)


@dataclass(frozen=True)
class RetainReference:
    """Per retain row, what the base model gives the retain term of ``mode`` (see the module docstring)."""

    mode: str
    """The retain mode it was computed for: ``kl`` | ``repr`` | ``direction``."""
    layers: tuple[int, ...]
    """The stream's layers (``repr`` / ``direction``); empty for ``kl``."""
    rows: dict[int, Tensor]
    """Row position in the retain set → its reference, unpadded, on the host."""

    @property
    def nbytes(self) -> int:
        """Bytes held (the module docstring's formula, measured)."""
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def _rows(self, index: Sequence[int], want: str) -> list[Tensor]:
        if self.mode != want:
            raise ValueError(f"this reference is for retain_mode={self.mode!r}, not {want!r}")
        missing = [i for i in index if i not in self.rows]
        if missing:
            raise KeyError(f"retain rows {missing[:5]} have no reference (computed for {len(self.rows)} rows)")
        return [self.rows[i] for i in index]

    def response_logits(self, index: Sequence[int],
                        mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """The reference logits of rows ``index`` laid out as :func:`training.losses.response_logits`
        lays out the step's batch (``mask``: its ``ResponseLogits.mask``); zero at the positions
        :func:`training.losses.kl_loss` does not read (those not predicting a response token)."""
        rows = self._rows(index, "kl")
        sel = mask[:, 1:].bool()
        _check_counts(rows, sel, "response tokens")
        out = torch.zeros((*mask.shape, rows[0].shape[-1]), dtype=rows[0].dtype, device=mask.device)
        for i, row in enumerate(rows):  # row by row: no second copy of the batch's logits
            out[i, :-1][sel[i]] = row.to(mask.device)
        return out

    def stream(self, index: Sequence[int],
               attention_mask: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos layer d_model"]:
        """The reference stream of rows ``index`` laid out as the step's (left-padded) batch; zero at
        padding, which :func:`training.containment.repr_loss` masks out."""
        rows = self._rows(index, "repr")
        real = attention_mask.bool()
        _check_counts(rows, real, "tokens")
        out = torch.zeros((*attention_mask.shape, *rows[0].shape[1:]), dtype=rows[0].dtype,
                          device=attention_mask.device)
        for i, row in enumerate(rows):
            out[i][real[i]] = row.to(attention_mask.device)
        return out

    def last_prompt(self, index: Sequence[int],
                    device: torch.device | str = "cpu") -> Float[Tensor, "batch layer d_model"]:
        """The reference stream of rows ``index`` at their last prompt token."""
        return torch.stack(self._rows(index, "direction")).to(device)


def _check_counts(rows: list[Tensor], where: Tensor, what: str) -> None:
    got = [int(t.shape[0]) for t in rows]
    want = where.sum(-1).tolist()
    if got != want:
        raise ValueError(f"the cached reference has {got} {what} per row but the batch has {want}: "
                         "it was computed from other retain data or another tokenisation")


@torch.no_grad()
def batches_reference(lm: LoadedModel, cfg: UnlearnConfig, batches: Iterable[TokenBatch],
                      containment: Containment | None = None) -> RetainReference:
    """:class:`RetainReference` of the rows of ``batches`` (keyed by their ``index``), from the base
    model (adapter disabled, eval mode) of ``lm``.

    Raises:
        ValueError: ``cfg.retain_mode`` has no reference, or ``direction`` without the direction.
    """
    mode = cfg.retain_mode
    if mode not in REFERENCE_MODES:
        raise ValueError(f"retain_mode={mode!r} has no base-model reference (only {', '.join(REFERENCE_MODES)})")
    if mode == "direction" and (containment is None or containment.direction is None):
        raise ValueError("retain_mode='direction' needs the direction: pass containment=Containment(direction=...)")
    layers = retain_layers(lm, cfg, containment) if mode != "kl" else []
    rows: dict[int, Tensor] = {}
    was_training = lm.model.training
    lm.model.eval()
    try:
        with adapter_disabled(lm):
            for batch in batches:
                b = batch.to(lm.device)
                if mode == "kl":
                    rl = response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
                    keep = rl.mask[:, 1:].bool()
                    per = [rl.logits[i, :-1][keep[i]] for i in range(len(b))]
                else:
                    acts = stream_activations(lm.model, b.input_ids, b.attention_mask, layers)
                    if mode == "repr":
                        real = b.attention_mask.bool()
                        per = [acts[i][real[i]] for i in range(len(b))]
                    else:
                        last = last_prompt_index(b.response_mask)
                        per = [acts[i, int(last[i])] for i in range(len(b))]
                # A copy: a view would keep the whole batch's tensor alive.
                rows.update({r: t.to("cpu", copy=True) for r, t in zip(b.index, per, strict=True)})
    finally:
        lm.model.train(was_training)
    return RetainReference(mode=mode, layers=tuple(layers), rows=rows)


def retain_reference(lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet | None,
                     containment: Containment | None = None) -> RetainReference | None:
    """The run's :class:`RetainReference` of every row of the retain set ``ds``, in
    ``cfg.retain_batch_size`` batches tokenised as the steps tokenise them; ``None`` (nothing computed)
    when ``cfg.retain_mode`` has no reference (``none``, ``ce``) or there is no retain set."""
    if cfg.retain_mode not in REFERENCE_MODES or ds is None or len(ds) == 0:
        return None
    bs = cfg.retain_batch_size
    batches = (collate_rows(lm, cfg, ds, list(range(s, min(s + bs, len(ds)))), forget=False)
               for s in range(0, len(ds), bs))
    return batches_reference(lm, cfg, batches, containment)
