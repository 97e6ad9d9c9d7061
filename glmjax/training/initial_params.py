"""A run's initial parameters: an HF directory, an orbax model checkpoint, another training run's
newest verified checkpoint, or a seeded random init.

Built lazily and at most once per process: a fresh run builds them to initialise the train state;
a resumed run builds them only when the objective's frozen state needs them (a DPO reference that
starts equal to the policy).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from glmjax.models.config import ModelConfig
from glmjax.training.run_config import check_same_function
from glmjax.training.state import init_random_params, model_graph


class InitialParams:
    """``initial()`` -> the run's initial parameters (nested dict sharded by ``shardings``).

    Args:
      config: the run's model config; a checkpoint whose config computes another function is
        refused (``glmjax.training.run_config``).
      mesh, shardings: where the parameters go.
      seed: random init seed (used without a checkpoint).
      hf_dir, orbax_dir, run_dir: at most one initial checkpoint (``run_dir``: a ``launch.train``
        MODEL_DIR, of which the newest verified checkpoint's parameters are read).
    """

    def __init__(self, config: ModelConfig, mesh: Mesh, shardings: dict, seed: int,
                 hf_dir: str | None = None, orbax_dir: str | None = None, run_dir: str | None = None):
        if sum(map(bool, (hf_dir, orbax_dir, run_dir))) > 1:
            raise ValueError("set at most one of train.init_from_hf, train.init_from_orbax and "
                             "train.init_from_run")
        self.config, self.mesh, self.shardings, self.seed = config, mesh, shardings, seed
        self.hf_dir, self.orbax_dir, self.run_dir = hf_dir, orbax_dir, run_dir
        self._params: dict | None = None
        self.used = False

    @property
    def source(self) -> str:
        return self.hf_dir or self.orbax_dir or self.run_dir or f"random init (seed {self.seed})"

    def __call__(self) -> dict:
        """The parameters (built on the first call; later calls return the same arrays)."""
        self.used = True
        return self._build()

    def take(self) -> tuple[dict, bool]:
        """(the parameters, whether anything else holds them): for building the train state,
        which may then take over (donate) buffers nobody else holds."""
        return self._build(), self.used

    def release(self) -> None:
        """Drops this object's reference to the parameters."""
        self._params = None

    def abstract(self) -> dict:
        """The parameters as ``ShapeDtypeStruct``s carrying their shardings (nothing read)."""
        _, shapes = model_graph(self.config)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.shardings)

    def _build(self) -> dict:
        if self._params is None:
            self._params = self._load() if (self.hf_dir or self.orbax_dir or self.run_dir) else init_random_params(
                self.config, self.mesh, self.seed, self.shardings)
        return self._params

    def _load(self) -> dict:
        from flax import nnx

        if self.hf_dir:
            from glmjax.checkpoints.hf import from_pretrained

            model = from_pretrained(self.hf_dir, self.config.param_dtype, mesh=self.mesh)
        elif self.run_dir:
            from glmjax.checkpoints.training_runs import load_trained_model

            model = load_trained_model(self.run_dir, mesh=self.mesh, param_dtype=self.config.param_dtype)
        else:
            from glmjax.checkpoints.orbax_io import load_model

            model = load_model(self.orbax_dir, mesh=self.mesh, param_dtype=self.config.param_dtype)
        check_same_function(model.config, self.config, self.source, "initial checkpoint")
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        # Same values, laid out as the train state wants them (a no-op when they already are).
        return jax.device_put(params, self.shardings)
