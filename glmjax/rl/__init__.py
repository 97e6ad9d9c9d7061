"""Reinforcement learning for reasoning (T1): rollouts on the trainer's mesh as its batch source.

The losses live in ``glmjax.objectives.rl``, the rewards in ``glmjax.evals.rewards``; this package
joins the inference engine, the rewards and the trainer's loop hook, so it sits below all three.
"""
