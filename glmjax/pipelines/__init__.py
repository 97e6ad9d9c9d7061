"""Data-construction jobs built on LLM clients, resumable and append-only.

* :mod:`glmjax.pipelines.runner`: the runner every job uses (items keyed by id, one fsync-ed JSONL
  row per finished item, resume, retries of failed items, concurrency, progress).
* :mod:`glmjax.pipelines.t1_cot`: T1's SFT-initialisation data (attempts -> critiques -> one
  rewritten solution with trial and error and self-verification).
* :mod:`glmjax.pipelines.agentwrite`: LongWriter's AgentWrite (plan -> paragraph-by-paragraph
  writing -> ``{"messages": [user, assistant]}`` SFT records).
* :mod:`glmjax.pipelines.cof`: LongCite's CoF (QA from long documents -> chunk-level ->
  sentence-level citations -> filtered ``{"messages"}`` SFT records).
* :mod:`glmjax.pipelines.longreward`: LongReward (sampled responses scored on four dimensions by
  a judge -> best-vs-worst DPO pairs).
* :mod:`glmjax.pipelines.retrieval`: chunking, BM25 and embedding retrieval (CoF, LongReward,
  LongBench v2's rag mode).

Run them with ``python -m launch.pipeline NAME ...``.
"""
