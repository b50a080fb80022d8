"""Refusal unlearning on LoRA adapters: losses, data, configs, checkpoints and the trainer.

Modules: ``losses`` (pure objectives), ``data`` (the sets a config asks for; re-exports
``dataset`` (examples), ``responses`` (the model's own responses, cached and judged),
``forget_set`` / ``retain_set`` / ``compliance_set`` (the builders) and ``collate``
(tokenisation, batch order)), ``config`` (``UnlearnConfig``), ``lora`` (attach/save/load/merge
adapters), ``checkpoint`` (atomic, resumable), ``containment`` (representation / direction retain
terms, per-token retain weight, the concept-gated adapter), ``step`` (one training step, with an optional phase clock),
``reference`` (NPO's cached reference log-probs), ``run_files`` (metrics, resume checks, snapshots,
the result), ``distributed`` (data parallelism), ``loop`` (the optimisation loop and its update) and ``trainer`` (setting a run
up: ``unlearn``).
"""

from training.config import UnlearnConfig
from training.lora import detach_lora, load_adapter, merged_adapter
from training.trainer import UnlearnResult, unlearn

__all__ = ["UnlearnConfig", "UnlearnResult", "unlearn", "load_adapter", "detach_lora", "merged_adapter"]
