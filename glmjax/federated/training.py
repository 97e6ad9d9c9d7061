"""The active party's training loop (it drives every passive party through its channel).

Per step: minibatch of training rows -> ``sent`` to each live passive party with lambda_p > 0 ->
their gradients, summed with weights lambda_p -> one update of f_A, h (and g_A). Checkpoints:
the active party writes its own file first, then asks each live passive party to write its own,
so a passive checkpoint is never newer than the active one. A restarted run resumes from the
active checkpoint; the passive parties restore theirs at the handshake.

A passive party lost mid-training (unreachable, deadline passed) is handled by
``on_passive_loss``: "continue" drops it and trains on (the drop is kept in the checkpoint, a
resumed run does not call it again), "stop" saves a checkpoint and returns (``stopped``); a
restarted run then calls every passive party again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import gin
import numpy as np
from absl import logging

from glmjax.federated.active import ActiveParty
from glmjax.federated.channel import HandshakeRequest, PartyConfigError, PassiveChannel, PassiveUnavailableError, StepRequest
from glmjax.federated.checkpoints import load_party_checkpoint, read_party_checkpoint_meta, save_party_checkpoint
from glmjax.federated.data import PartyData, train_test_split
from glmjax.federated.passive import VARIANTS

LOSS_POLICIES = ("continue", "stop")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    """The active party's settings.

    Attributes:
      variant: "R" or "C" (must match the passive parties').
      encoder_hidden / rep_dim: f_A's hidden widths and the width of z.
      head_hidden: h's hidden widths (() = linear head).
      proj_dim: g_A's output width (APFed-C).
      trade_off: lambda_p of every passive party; ``trade_offs`` overrides it per party name.
        lambda = 0: the party is not called at all (the active-alone baseline).
      epochs, batch_size: passes over the training rows, rows per step (the last partial
        batch of an epoch is dropped so every step has the same shape).
      seed: initialisation and batch-order seed.
      test_fraction, split_seed: the held-out test rows (chosen from the ids).
      checkpoint_dir: where ``active.npz`` is kept (None: no checkpoints, no resume).
      checkpoint_every: steps between checkpoints (and one at the end).
      on_passive_loss: "continue" or "stop".
    """

    variant: str = "R"
    encoder_hidden: Sequence[int] = (64,)
    rep_dim: int = 32
    head_hidden: Sequence[int] = ()
    proj_dim: int = 32
    trade_off: float = 1.0
    trade_offs: Mapping[str, float] | None = None
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    test_fraction: float = 0.2
    split_seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 100
    on_passive_loss: str = "continue"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise PartyConfigError(f"ActiveConfig.variant={self.variant!r}: expected one of {VARIANTS}")
        if self.on_passive_loss not in LOSS_POLICIES:
            raise PartyConfigError(f"ActiveConfig.on_passive_loss={self.on_passive_loss!r}: "
                                   f"expected one of {LOSS_POLICIES}")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise PartyConfigError("ActiveConfig: epochs, batch_size and checkpoint_every must be >= 1")

    def lambda_of(self, party: str) -> float:
        return float((self.trade_offs or {}).get(party, self.trade_off))


@dataclasses.dataclass
class TrainResult:
    """What a training run did. ``stopped`` is None or "passive_lost" (on_passive_loss=stop)."""

    step: int
    total_steps: int
    test_accuracy: float
    train_accuracy: float
    task_loss: float
    passive_losses: dict[str, float]
    lost: list[str]
    stopped: str | None
    resumed_from: int
    events: list[str]
    checkpoint: str | None


class _Stop(Exception):
    pass


def _active_party(in_dim: int, num_classes: int, config: ActiveConfig) -> ActiveParty:
    return ActiveParty(in_dim, num_classes, variant=config.variant,
                       encoder_hidden=config.encoder_hidden, rep_dim=config.rep_dim,
                       head_hidden=config.head_hidden, proj_dim=config.proj_dim, seed=config.seed)


def _checkpoint_path(config: ActiveConfig) -> str | None:
    return None if config.checkpoint_dir is None else os.path.join(config.checkpoint_dir, "active.npz")


def restore_active(in_dim: int, num_classes: int | None, config: ActiveConfig) -> tuple[ActiveParty, dict | None]:
    """The active party, from its checkpoint when one exists (meta, else None).

    ``num_classes`` None: taken from the checkpoint (prediction without labels).
    """
    path = _checkpoint_path(config)
    if path is None or not os.path.exists(path):
        if num_classes is None:
            raise PartyConfigError(f"no active checkpoint in {config.checkpoint_dir!r}")
        return _active_party(in_dim, num_classes, config), None
    if num_classes is None:
        num_classes = read_party_checkpoint_meta(path)["num_classes"]
    party = _active_party(in_dim, num_classes, config)
    state, meta = load_party_checkpoint(path, party.state())
    if meta["variant"] != config.variant:
        raise PartyConfigError(f"{path}: an APFed-{meta['variant']} checkpoint, the config says APFed-{config.variant}")
    party.load_state(state)
    return party, meta


def train_active(data: PartyData, channels: Sequence[PassiveChannel], config: ActiveConfig,
                 on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Trains the active party with the passive parties behind ``channels``.

    Args:
      data: the active view with labels.
      channels: one per passive party (``channel.name`` = the party's name).
      on_step: called with the number of completed steps after every update.

    Raises:
      IdMismatchError, PartyConfigError: at the handshake.
      PassiveUnavailableError: a passive party unreachable at the start.
    """
    if data.labels is None:
        raise PartyConfigError(f"{data.source}: the active party's data needs labels")
    train_rows, test_rows = train_test_split(data.ids, config.test_fraction, config.split_seed)
    steps_per_epoch = len(train_rows) // config.batch_size
    if steps_per_epoch == 0:
        raise PartyConfigError(f"batch_size={config.batch_size} exceeds the {len(train_rows)} training rows")
    total = config.epochs * steps_per_epoch
    party, meta = restore_active(data.x.shape[1], data.num_classes, config)
    step = meta["step"] if meta else 0
    lost = list(meta["lost"]) if meta else []
    events: list[str] = []

    def note(message: str, warn: bool = False) -> None:
        events.append(message)
        (logging.warning if warn else logging.info)("%s", message)

    if meta:
        note(f"active: resumed from step {step} of {total}" + (f" (lost earlier: {lost})" if lost else ""))
    live = [ch for ch in channels if ch.name not in lost and config.lambda_of(ch.name) != 0.0]
    for ch in channels:
        if ch.name not in lost and config.lambda_of(ch.name) == 0.0:
            note(f"active: passive party {ch.name!r} has lambda = 0, not called (active-alone training)")
    if step < total:
        for ch in live:
            reply = ch.handshake(HandshakeRequest(config.variant, party.sent_dim, data.ids, step))
            if reply.party != ch.name:
                raise PartyConfigError(f"the passive party configured as {ch.name!r} calls itself {reply.party!r}")
            note(f"active: passive party {reply.party!r} joined (its restored step {reply.restored_step})")

    def lose(ch: PassiveChannel, err: PassiveUnavailableError, at: int) -> None:
        live.remove(ch)
        if config.on_passive_loss == "continue":
            lost.append(ch.name)
            note(f"active: passive party {ch.name!r} lost at step {at} ({err}); on_passive_loss=continue: "
                 f"training continues without it ({len(live)} passive parties left)", warn=True)
        else:
            note(f"active: passive party {ch.name!r} lost at step {at} ({err}); on_passive_loss=stop: "
                 f"saving a checkpoint at step {at} and stopping", warn=True)
            save(at, tell_passives=False)  # saved before it is listed: a restarted run calls it again
            lost.append(ch.name)
            raise _Stop

    def save(at: int, tell_passives: bool = True) -> None:
        path = _checkpoint_path(config)
        if path is None:
            return
        save_party_checkpoint(path, party.state(), {"step": at, "lost": lost, "variant": config.variant,
                                                   "num_classes": data.num_classes})
        for ch in list(live) if tell_passives else []:
            try:
                ch.checkpoint(at)
            except PassiveUnavailableError as err:
                lose(ch, err, at)

    stopped, task_loss, passive_losses = None, float("nan"), {}
    orders: dict[int, np.ndarray] = {}
    try:
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: np.random.default_rng([config.seed, epoch]).permutation(train_rows)}
            index = orders[epoch][k * config.batch_size:(k + 1) * config.batch_size].astype(np.int32)
            x, y = data.x[index], data.labels[index]
            g_sent = None
            if live:
                sent = party.sent(x)
                for ch in list(live):
                    try:
                        reply = ch.step(StepRequest(step, index, sent))
                    except PassiveUnavailableError as err:
                        lose(ch, err, step)
                        continue
                    passive_losses[ch.name] = reply.loss
                    weighted = config.lambda_of(ch.name) * reply.grad
                    g_sent = weighted if g_sent is None else g_sent + weighted
            task_loss = party.update(x, y, g_sent)
            step += 1
            if step % config.checkpoint_every == 0 or step == total:
                save(step)
            if on_step is not None:
                on_step(step)
    except _Stop:
        stopped = "passive_lost"
    if stopped is None:
        for ch in list(live):
            try:
                ch.finish(step)
            except PassiveUnavailableError as err:
                note(f"active: passive party {ch.name!r} lost at the end ({err}); training was complete", warn=True)
    return TrainResult(
        step=step, total_steps=total,
        test_accuracy=accuracy(party, data, test_rows), train_accuracy=accuracy(party, data, train_rows),
        task_loss=task_loss, passive_losses=passive_losses, lost=lost, stopped=stopped,
        resumed_from=meta["step"] if meta else 0, events=events, checkpoint=_checkpoint_path(config))


def accuracy(party: ActiveParty, data: PartyData, rows: np.ndarray) -> float:
    """Fraction of ``rows`` where argmax h(f_A(x_A)) equals the label (the active party alone)."""
    return float(np.mean(party.predict(data.x[rows]) == data.labels[rows]))


def predict_active(data: PartyData, config: ActiveConfig) -> tuple[np.ndarray, float]:
    """Predictions for every row of ``data`` from the active checkpoint alone, and the accuracy on
    the test rows when ``data`` has labels (NaN otherwise). No passive party is contacted.

    Raises:
      PartyConfigError: no checkpoint in ``config.checkpoint_dir``.
    """
    party, _ = restore_active(data.x.shape[1], None, config)
    predictions = party.predict(data.x)
    if data.labels is None:
        return predictions, float("nan")
    _, test_rows = train_test_split(data.ids, config.test_fraction, config.split_seed)
    return predictions, float(np.mean(predictions[test_rows] == data.labels[test_rows]))

