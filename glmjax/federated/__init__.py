"""APFed: active-passive vertical federated learning (Liu et al., arXiv 2409.04111).

The active party holds one view, the labels, an encoder f_A and a task head h; passive parties hold
other views of the same samples (aligned by shared ids) and help during training only: each one
receives the active representation z = f_A(x_A) (APFed-R) or its projection g_A(z) (APFed-C) and
returns the gradient of its own loss with respect to that tensor. Inference is argmax h(f_A(x_A)),
with the active party alone.

Modules: ``data`` (multi-view data sets, per-party CSV/NPZ files, id alignment), ``modules`` (NNX
networks), ``losses``, ``channel`` (messages, codec, in-process channel), ``grpc_channel``
(loopback/network transport), ``active`` / ``passive`` (party logic), ``checkpoints``,
``optim`` (party optimiser settings), ``training`` (the active party's loop), ``experiments``
(lambda x seed sweeps).
"""
