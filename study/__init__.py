"""The study API: a model with its cached stages (:class:`Study`), conditions pooled over seeds, and
the verdict arithmetic (paired drops with seed-and-prompt intervals). Experiments build on these
public names only."""

from study.conditions import (
           condition,
           evaluate_sets,
           operating_point,
           operating_step,
           pooled,
           save_records,
           suite_sets,
)
from study.core import Study, StudyConfig, adapter_id_of
from study.verdicts import claim, drop_contrast, drop_difference, mean_drop, paired_drop

__all__ = ["StudyConfig", "Study", "adapter_id_of", "suite_sets", "evaluate_sets", "pooled", "condition",
           "operating_step", "operating_point", "save_records", "paired_drop", "mean_drop", "drop_difference", "drop_contrast",
           "claim"]
