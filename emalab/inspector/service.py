"""The inspector's service layer: validates requests and composes library calls into JSON.

No model logic lives here: one inspection is :func:`interp.layer_inspection.inspect_prompt` under the
interventions of :mod:`probes.interventions`, on the base weights (``adapter_disabled``) and, when
an adapter is loaded, on the adapted weights; the answer is labelled by the keyword judge. The
web layer (:mod:`emalab.inspector.server`) only moves this JSON.

One lock serialises every use of the model: hooks and adapter toggles are model-global state,
so two requests computing at once would see each other's interventions.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

from interp.config import JsonConfig
from interp.loading import LoadedModel, adapter_disabled

from .vectors import InspectorVectors

__all__ = ["InspectorConfig", "InspectorService", "RequestError", "REFUSAL"]

REFUSAL = "refusal"
"""Column name of the refusal direction, after the concept columns."""


class RequestError(ValueError):
    """A request the service rejects; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class InspectorConfig(JsonConfig):
    """Limits and sizes of one inspector session."""

    k: int = 5
    """Logit-lens tokens shown per layer."""
    answer_tokens: int = 48
    """Greedy tokens generated for the answer."""
    max_prompt_tokens: int = 256
    """Longest prompt accepted, in tokens of the chat-formatted prompt."""
    max_prompt_chars: int = 4000
    """Longest prompt accepted, in characters (checked before tokenising)."""
    max_coeff: float = 50.0
    """Largest |coefficient| accepted for activation addition."""
    judge: str = "keyword"
    """Refusal judge for the answer's label."""
    raw: bool = False
    """Feed prompts as plain text, without a chat template (base models that have none)."""

    def __post_init__(self) -> None:  # field types and floors: interp.config.check_fields
        if not 1 <= self.k <= 20:
            raise ValueError(f"k must be in [1, 20], got {self.k}")
        if not 1 <= self.answer_tokens <= 512:
            raise ValueError(f"answer_tokens must be in [1, 512], got {self.answer_tokens}")
        if self.max_prompt_tokens < 8 or self.max_prompt_chars < 1:
            raise ValueError("max_prompt_tokens must be >= 8 and max_prompt_chars >= 1")
        if not (math.isfinite(self.max_coeff) and self.max_coeff > 0):
            raise ValueError(f"max_coeff must be a positive number, got {self.max_coeff}")


_INSPECT_FIELDS = {"prompt", "ablate", "steer"}
_STEER_FIELDS = {"concept", "layer", "coeff"}


@dataclass(frozen=True)
class Steer:
    concept: str
    layer: int
    coeff: float


@dataclass(frozen=True)
class InspectRequest:
    prompt: str
    ablate: bool
    steer: Steer | None


class InspectorService:
    """Inspections of one loaded model (optionally carrying an adapter) against fixed directions.

    Args:
        lm: the model; if it carries a PEFT adapter, every inspection shows base and adapted.
        vectors: concept vectors and refusal direction, computed on the base weights.
        adapter: path or name of the adapter, for display.
    """

    def __init__(self, lm: LoadedModel, vectors: InspectorVectors, cfg: InspectorConfig | None = None,
                 adapter: str | None = None) -> None:
        from evals.judge import get_judge
        from interp.adapter import d_model, n_layers
        from training.lora import has_adapter

        self.lm = lm
        self.cfg = cfg or InspectorConfig()
        self.vectors = vectors
        vectors.concepts.check_model(lm.model)
        vectors.refusal.check_model(lm.model)
        self.n_layers = n_layers(lm.model)
        self.d_model = d_model(lm.model)
        self.layers = list(range(self.n_layers))
        missing = sorted(set(self.layers) - set(vectors.concepts.layers))
        if missing:
            raise ValueError(f"the concept vectors lack layers {missing}; the inspector needs every layer")
        self.concept_dirs = vectors.concepts.as_directions()
        self.columns = [*self.concept_dirs, REFUSAL]
        self.has_adapter = has_adapter(lm)
        self.adapter = adapter
        self.adapter_id = lm.extra.get("adapter_id")
        self.judge = get_judge(self.cfg.judge)
        self._lock = threading.Lock()
        self._phase: dict = {"busy": False}

    # -- read-only endpoints -------------------------------------------------------------------------
    def meta(self) -> dict:
        from evals.suite import DOMAINS, EXTRA_SETS

        dtype = str(next(self.lm.model.parameters()).dtype).removeprefix("torch.")
        return {
            "model": self.lm.name, "weights_id": self.lm.weights_id, "dtype": dtype, "device": str(self.lm.device),
            "n_layers": self.n_layers, "d_model": self.d_model, "layers": self.layers,
            "concepts": list(self.concept_dirs), "columns": self.columns,
            "domains": list(DOMAINS), "extra_sets": list(EXTRA_SETS),
            "adapter": {"present": self.has_adapter, "path": self.adapter, "id": self.adapter_id},
            "vectors": self.vectors.to_dict(),
            "steer_concepts": self.columns,
            "limits": self.cfg.to_dict(),
        }

    def prompts(self, domain: str | None) -> dict:
        from evals.suite import EmptySplitError, UnknownDomainError, load_prompts

        if not domain:
            raise RequestError("give a domain, e.g. /api/prompts?domain=cybersecurity")
        try:
            items = load_prompts(domain, "eval")
        except UnknownDomainError as err:
            raise RequestError(str(err)) from err
        except EmptySplitError as err:
            raise RequestError(str(err), 404) from err
        return {"domain": domain, "split": "eval",
                "prompts": [{"id": p.id, "text": p.text, "category": p.category} for p in items]}

    def status(self) -> dict:
        return dict(self._phase)

    # -- validation ------------------------------------------------------------------------------------
    def parse(self, body: object) -> InspectRequest:
        """Validate an inspect request body; raises :class:`RequestError` with the fix in the message."""
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object like {\"prompt\": \"...\"}")
        unknown = sorted(set(body) - _INSPECT_FIELDS)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; allowed: {sorted(_INSPECT_FIELDS)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string")
        if not prompt.strip():
            raise RequestError("the prompt is empty")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise RequestError(f"the prompt has {len(prompt)} characters; the limit is {self.cfg.max_prompt_chars}", 413)
        n_tokens = self.count_tokens(prompt)
        if n_tokens > self.cfg.max_prompt_tokens:
            raise RequestError(f"the prompt is {n_tokens} tokens long (with the chat template); the limit is "
                               f"{self.cfg.max_prompt_tokens}", 413)
        ablate = body.get("ablate", False)
        if not isinstance(ablate, bool):
            raise RequestError("'ablate' must be true or false")
        return InspectRequest(prompt, ablate, self._parse_steer(body.get("steer")))

    def _parse_steer(self, steer: object) -> Steer | None:
        if steer is None:
            return None
        if not isinstance(steer, dict):
            raise RequestError("'steer' must be null or an object {concept, layer, coeff}")
        unknown = sorted(set(steer) - _STEER_FIELDS)
        missing = sorted(_STEER_FIELDS - set(steer))
        if unknown or missing:
            raise RequestError(f"'steer' needs exactly {sorted(_STEER_FIELDS)}; unknown {unknown}, missing {missing}")
        concept, layer, coeff = steer["concept"], steer["layer"], steer["coeff"]
        if concept not in self.columns:
            raise RequestError(f"unknown concept {concept!r}; choose one of {self.columns}")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise RequestError(f"bad layer {layer!r}: the model has layers 0..{self.n_layers - 1}")
        if isinstance(coeff, bool) or not isinstance(coeff, int | float) or not math.isfinite(coeff):
            raise RequestError(f"bad coefficient {coeff!r}: give a finite number")
        if abs(coeff) > self.cfg.max_coeff:
            raise RequestError(f"bad coefficient {coeff}: |coeff| must be at most {self.cfg.max_coeff:g}")
        return Steer(concept, layer, float(coeff))

    def count_tokens(self, prompt: str) -> int:
        from interp.chat import format_prompts

        text = format_prompts(self.lm.tokenizer, [prompt], raw=self.cfg.raw)[0]
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- computation -------------------------------------------------------------------------------------
    @contextmanager
    def _interventions(self, req: InspectRequest) -> Iterator[None]:
        from probes.interventions import ablate_direction, add_activation

        with ExitStack() as stack:
            if req.ablate:
                stack.enter_context(ablate_direction(self.lm, self.vectors.refusal))
            if req.steer is not None:
                s = req.steer
                # "At layer L" is the input of block L (resid_pre[L] == resid_post[L-1]), so every row
                # from L down shows the effect, and a concept contributes the difference of means
                # measured at that very point of the stream: coeff 1 adds (domain − benign) there.
                # (A resid_post[L] hook would be invisible to the trace's own reading of row L.)
                vec = (self.vectors.refusal if s.concept == REFUSAL
                       else self.concept_dirs[s.concept].select(max(s.layer - 1, 0)))
                stack.enter_context(add_activation(self.lm, vec, s.layer, s.coeff, site="resid_pre"))
            yield

    def _view(self, req: InspectRequest, name: str, step: int, total: int) -> dict:
        from interp.generate import generate
        from interp.layer_inspection import inspect_prompt

        t0, cpu0 = time.perf_counter(), time.process_time()
        self._set_phase(f"{name}: layer-by-layer trace", step, total)
        with self._interventions(req):
            ins = inspect_prompt(self.lm, req.prompt, concepts=self.concept_dirs, refusal=self.vectors.refusal,
                                 k=self.cfg.k, layers=self.layers, raw=self.cfg.raw)
            t1 = time.perf_counter()
            self._set_phase(f"{name}: generating {self.cfg.answer_tokens} tokens", step + 1, total)
            answer = generate(self.lm, [req.prompt], max_new_tokens=self.cfg.answer_tokens, progress=False,
                              max_prompt_tokens=self.cfg.max_prompt_tokens, raw=self.cfg.raw)[0]
            t2 = time.perf_counter()
        ins.answer = answer
        verdict = self.judge.judge([req.prompt], [answer])[0]
        out = ins.to_dict()
        out["lens_tokens"] = [[_token_text(self.lm.tokenizer, i, t) for i, t in zip(ids, toks, strict=True)]
                              for ids, toks in zip(ins.lens_ids, ins.lens_tokens, strict=True)]
        proj = [[*row, ref] for row, ref in zip(ins.projections, ins.refusal, strict=True)]
        out["columns"] = self.columns
        out["matrix"] = proj
        out["cosine"] = [[None if v is None else v / max(norm, 1e-12) for v in row]
                         for row, norm in zip(proj, ins.resid_norm, strict=True)]
        out["label"] = verdict.label
        out["label_reason"] = verdict.reason
        out["seconds"] = time.perf_counter() - t0
        # CPU seconds of this process: on a shared, oversubscribed CPU the wall time says more about
        # the neighbours than about the inspection.
        out["timing"] = {"trace": t1 - t0, "generate": t2 - t1, "judge": time.perf_counter() - t2,
                         "cpu": time.process_time() - cpu0,
                         "answer_tokens": len(self.lm.tokenizer(answer, add_special_tokens=False)["input_ids"])}
        return out

    def _set_phase(self, phase: str, step: int, total: int) -> None:
        self._phase = {"busy": True, "phase": phase, "step": step, "total": total}

    def inspect(self, req: InspectRequest) -> dict:
        """Inspect ``req.prompt`` (base, and adapted if an adapter is loaded) under its interventions.

        Blocks while another inspection holds the model.
        """
        with self._lock:
            t0, cpu0 = time.perf_counter(), time.process_time()
            total = 4 if self.has_adapter else 2
            try:
                with adapter_disabled(self.lm):
                    views = {"base": self._view(req, "base", 0, total)}
                if self.has_adapter:
                    views["adapted"] = self._view(req, "adapted", 2, total)
            finally:
                self._phase = {"busy": False}
            out: dict = {"views": views, "columns": self.columns, "layers": self.layers,
                         "request": {"ablate": req.ablate, "steer": asdict(req.steer) if req.steer else None}}
            if "adapted" in views:
                out["diff"] = {key: _difference(views["adapted"][key], views["base"][key])
                               for key in ("matrix", "cosine")}
            out["seconds"] = time.perf_counter() - t0
            out["cpu_seconds"] = time.process_time() - cpu0
            return out


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table, which byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def _token_text(tokenizer, token_id: int, decoded: str) -> str:
    """A lens token as the page shows it: decoded text, or, for a token holding part of a multi-byte
    character (decoded alone it is only U+FFFD), its bytes as ``\\xNN`` escapes."""
    if "\ufffd" not in decoded:
        return decoded
    piece = tokenizer.convert_ids_to_tokens(token_id)
    try:  # byte-level BPE (GPT-2, Qwen, Llama 3): every character of the piece stands for one byte
        return bytes(_byte_decoder()[c] for c in piece).decode("utf-8", errors="backslashreplace")
    except (KeyError, TypeError):
        return piece if isinstance(piece, str) else decoded  # sentencepiece byte pieces read "<0xE4>"


def _difference(a: list[list[float | None]], b: list[list[float | None]]) -> list[list[float | None]]:
    return [[None if x is None or y is None else x - y for x, y in zip(ra, rb, strict=True)]
            for ra, rb in zip(a, b, strict=True)]
