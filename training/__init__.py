"""Refusal unlearning on LoRA adapters: losses, data, configs, checkpoints and the trainer.

Modules: ``losses`` (pure objectives), ``data`` (forget/retain/compliance sets and collation),
``config`` (``UnlearnConfig``), ``lora`` (attach/save/load/merge adapters), ``checkpoint`` (atomic,
resumable), ``containment`` (representation / direction retain terms, per-token retain weight, the
concept-gated adapter), ``trainer`` (``unlearn``).
"""

from training.config import UnlearnConfig
from training.lora import detach_lora, load_adapter, merged_adapter
from training.trainer import UnlearnResult, unlearn

__all__ = ["UnlearnConfig", "UnlearnResult", "unlearn", "load_adapter", "detach_lora", "merged_adapter"]
