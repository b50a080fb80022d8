"""Label generated responses as refusal, compliance or incoherent, and score them for alignment.

Two judges share one protocol (:class:`Judge`): :class:`KeywordJudge` reads the opening of a
response for refusal phrases, and :class:`ModelJudge` asks a chat model and reads the next-token
probabilities of its answer letters in one batched forward. Both run :func:`coherence` first, so a
degenerate output is ``incoherent`` and never counts as compliance.

A prompt whose aligned answer is a rebuttal (suite ``expected == "rebut"``: "Are all X lazy?")
gets a fourth label, ``rebuttal``, when a response that would otherwise be ``compliance`` disagrees
with the premise in its opening (:func:`rebuttal_opening`). Judges learn each prompt's ``expected``
through an optional ``expected=`` argument of ``judge``; :func:`judge_responses` passes it to
judges that take it and falls back to the two-argument call for those that do not.

:func:`score_alignment_coherence` is the emergent-misalignment judge: a probability-weighted
0-100 score for alignment and for coherence, abstaining when the judge puts little mass on the
score tokens.

The concepts live in their own modules and are re-exported here, so ``from evals.judge import X``
keeps working: :mod:`evals.judgement` (labels, :class:`Judgement`, the :class:`Judge` protocol),
:mod:`evals.coherence` (the incoherence pre-check), :mod:`evals.opening` (what the keyword judge
reads), :mod:`evals.rebuttal`, :mod:`evals.keyword_judge`, :mod:`evals.model_judge` and
:mod:`evals.alignment_scores`. This module holds the seam: :func:`get_judge` and
:func:`judge_responses`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from evals.alignment_scores import (
    ALIGNMENT_TEMPLATE,
    COHERENCE_TEMPLATE,
    abstain_rates,
    score_alignment_coherence,
)
from evals.coherence import coherence, dominant_script, echoes_prompt, language_switch, precheck
from evals.judgement import ALIGNED_LABELS, LABELS, THREE_CLASS, Judge, Judgement, Label, three_class
from evals.keyword_judge import REFUSAL_PATTERNS, KeywordJudge
from evals.model_judge import JUDGE_TEMPLATE, ModelJudge
from evals.opening import opening_decided
from evals.rebuttal import REBUTTAL_PATTERNS, rebuttal_opening
from interp.loading import LoadedModel

__all__ = [
    "Label",
    "LABELS",
    "ALIGNED_LABELS",
    "THREE_CLASS",
    "three_class",
    "Judgement",
    "Judge",
    "judge_responses",
    "rebuttal_opening",
    "opening_decided",
    "UnknownJudgeError",
    "JUDGES",
    "coherence",
    "echoes_prompt",
    "dominant_script",
    "language_switch",
    "precheck",
    "KeywordJudge",
    "ModelJudge",
    "get_judge",
    "score_alignment_coherence",
    "abstain_rates",
    "REFUSAL_PATTERNS",
    "REBUTTAL_PATTERNS",
    "JUDGE_TEMPLATE",
    "ALIGNMENT_TEMPLATE",
    "COHERENCE_TEMPLATE",
]

JUDGES: tuple[str, ...] = ("keyword", "model")


def _takes_expected(judge: Judge) -> bool:
    try:
        params = inspect.signature(judge.judge).parameters
    except (TypeError, ValueError):
        return False
    return "expected" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def judge_responses(
    judge: Judge, prompts: Sequence[str], responses: Sequence[str], expected: Sequence[str] | None = None
) -> list[Judgement]:
    """``judge.judge(prompts, responses)``, with ``expected`` passed on to judges that accept it.

    A judge without the argument (the original protocol) never sees ``expected`` and so never says
    ``rebuttal``; its labels keep their old meaning.
    """
    if expected is not None and len(expected) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(expected)} expected values")
    if expected is not None and _takes_expected(judge):
        return judge.judge(prompts, responses, expected=expected)
    return judge.judge(prompts, responses)


class UnknownJudgeError(ValueError):
    """A judge name that :func:`get_judge` does not know; the message lists the valid names."""


def get_judge(name: str, lm: LoadedModel | None = None, **kwargs) -> Judge:
    """A judge by name: ``keyword`` or ``model`` (``lm`` defaults to the embedded model in bf16).

    Raises:
        UnknownJudgeError: ``name`` is not one of :data:`JUDGES`.
    """
    if name == "keyword":
        return KeywordJudge(**kwargs)
    if name == "model":
        if lm is None:
            from interp.loading import load_model

            lm = load_model(dtype="bfloat16")
        return ModelJudge(lm, **kwargs)
    raise UnknownJudgeError(f"unknown judge {name!r}; valid judges: {', '.join(JUDGES)}")
