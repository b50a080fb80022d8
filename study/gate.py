"""How a concept-gated run's gate splits the evaluation prompts: its accuracy on the target's prompts
(open, gate above one half) and on the untouched domains' prompts (shut), on the base model. A
cached stage per gate, so a report beside the frontier costs one base forward per prompt once."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from evals.suite import DOMAINS, check_domain, load_prompts
from interp.io import atomic_write_json, read_json
from interp.runs import Stage
from study.core import Study

__all__ = ["gate_report", "gate_summary"]


def gate_report(study: Study, run: str | Path, target: str, split: str = "eval") -> dict:
    """The gate of ``run`` (a gated :meth:`Study.unlearn` stage) on ``split`` (``eval_limit`` prompts
    per domain): :class:`training.containment.GateReport` as a dict.

    Raises:
        ValueError: ``run``'s adapter has no concept gate.
    """
    from training.containment import adapter_gate, gate_accuracy

    check_domain(target, allow_extra=False)
    gate = adapter_gate(Path(run) / "adapter")
    if gate is None:
        raise ValueError(f"{run} is not a concept-gated run (its adapter has no gate)")
    key = {"weights": study.weights_id, "dtype": study.cfg.eval_dtype, "gate": gate.describe(), "target": target,
           "split": split, "limit": study.cfg.eval_limit, "raw": study.cfg.raw_prompts}
    stage = Stage(study.results, "gate_accuracy", key)
    if not stage.done:
        path = stage.open()
        on = [p.text for p in load_prompts(target, split, limit=study.cfg.eval_limit)]
        off = [p.text for d in DOMAINS if d != target for p in load_prompts(d, split, limit=study.cfg.eval_limit)]
        report = gate_accuracy(study.lm, gate, on, off, batch_size=study.eval_batch_size, raw=study.cfg.raw_prompts)
        atomic_write_json(path / "gate.json", asdict(report))
        stage.complete(study.run_record())
    return read_json(stage.path / "gate.json")


def gate_summary(per_seed: list[dict]) -> dict:
    """Several seeds' :func:`gate_report` as their means, with ``"per_seed"`` kept."""
    keys = ("accuracy", "target_accuracy", "untouched_accuracy", "target_mean", "untouched_mean")
    return {**{k: sum(r[k] for r in per_seed) / len(per_seed) for k in keys}, "per_seed": per_seed}
