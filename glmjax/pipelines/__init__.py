"""Data-construction jobs built on LLM clients, resumable and append-only.

* :mod:`glmjax.pipelines.runner`: the runner every job uses (items keyed by id, one fsync-ed JSONL
  row per finished item, resume, retries of failed items, concurrency, progress).
* :mod:`glmjax.pipelines.t1_cot`: T1's SFT-initialisation data (attempts -> critiques -> one
  rewritten solution with trial and error and self-verification).
* :mod:`glmjax.pipelines.agentwrite`: LongWriter's AgentWrite (plan -> paragraph-by-paragraph
  writing -> ``{"messages": [user, assistant]}`` SFT records).

Run them with ``python -m launch.pipeline NAME ...``.
"""
