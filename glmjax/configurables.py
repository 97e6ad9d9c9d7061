"""Imports every module that registers gin configurables, so gin files can name them."""

from glmjax import sharding  # noqa: F401  (axis_rules)
from glmjax.data import factories  # noqa: F401  (lm_data, tokenizer, synthetic_arithmetic_file)
from glmjax.data import distill_data  # noqa: F401  (offline_distill_data)
from glmjax.data import pairs  # noqa: F401  (pair_data, synthetic_arithmetic_pairs_file)
from glmjax.evals import synthetic_task  # noqa: F401  (ArithmeticExactMatch)
from glmjax.models import config  # noqa: F401  (ModelConfig, preset)
from glmjax.objectives import lm  # noqa: F401  (LMObjective)
from glmjax.objectives import alpha, distill  # noqa: F401  (DistillObjective, alpha schedules)
from glmjax.objectives import dpo  # noqa: F401  (DPOObjective)
from glmjax.training import optimizer, trainer  # noqa: F401  (schedule, adamw, train)
