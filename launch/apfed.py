r"""APFed parties as processes, active-alone prediction, and the lambda x seed experiments.

  # a passive party (one per passive view); prints {"role": "passive", "address": ...} when up
  python -m launch.apfed --role=passive --gin_file=configs/apfed/digits_r.gin \
      --gin.passive/party_data.view=1 --gin.PassiveConfig.name="'view1'" --address=127.0.0.1:50051
  # the active party, given every passive party as name=host:port
  python -m launch.apfed --role=active --gin_file=configs/apfed/digits_r.gin \
      --passive=view1=127.0.0.1:50051 --passive=view2=127.0.0.1:50052
  # prediction from the active checkpoint alone (no passive party needed)
  python -m launch.apfed --role=predict --gin_file=configs/apfed/digits_r.gin --predictions_out=pred.csv
  # the experiments: both variants x lambda x seeds, a Markdown table per data set
  python -m launch.apfed --role=experiment --gin_file=configs/apfed/experiments.gin

Data: ``party_data`` in the gin scope of the role (``active/party_data.*``, ``passive/...``).
Exit codes: 0 done; 2 bad input or config (one line on stderr: file, line, column / ids);
3 the active party stopped because a passive party was lost (on_passive_loss = "stop",
checkpoint saved); 4 a passive party saw no call for --idle_timeout_s seconds. A passive party
stops on SIGTERM with exit 0 (outcome "terminated"; its checkpoints are the ones the active
party asked for).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys

import gin
from absl import app, flags, logging

from glmjax.federated import experiments
from glmjax.federated.channel import PartyConfigError, PassiveRejectedError, PassiveUnavailableError
from glmjax.federated.checkpoints import PartyCheckpointError
from glmjax.federated.data import FederatedDataError, party_data
from glmjax.federated.grpc_channel import GrpcPassiveChannel, PassiveServer
from glmjax.federated.passive import PassiveConfig, PassiveParty
from glmjax.federated.training import ActiveConfig, predict_active, train_active
from launch import common
from launch.common import GinConfigError, one_line, parse_gin, split_gin_shorthand

_ROLE = flags.DEFINE_enum("role", None, ["active", "passive", "predict", "experiment"], "Which party / job to run.")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin config files, applied in order.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, applied after the files.")
_ADDRESS = flags.DEFINE_string("address", "127.0.0.1:0", "passive: host:port to listen on (port 0: a free one).")
_PASSIVES = flags.DEFINE_multi_string("passive", [], "active: a passive party as NAME=HOST:PORT (repeatable).")
_IDLE_TIMEOUT = flags.DEFINE_float("idle_timeout_s", 600.0, "passive: exit (code 4) after this long without a call.")
_PREDICTIONS_OUT = flags.DEFINE_string("predictions_out", None, "predict: write id,prediction CSV here.")

_USER_ERRORS = (FederatedDataError, PartyConfigError, PartyCheckpointError, PassiveRejectedError,
                FileNotFoundError)


def _fail(message: str, code: int = 2) -> int:
    print(f"apfed: {message}", file=sys.stderr, flush=True)
    return code




def _data(role: str):
    with gin.config_scope(role):
        return party_data()


def _parse_passives() -> list[tuple[str, str]]:
    parties = []
    for spec in _PASSIVES.value:
        name, sep, address = spec.partition("=")
        if not sep or not name or ":" not in address:
            raise PartyConfigError(f"--passive={spec!r}: expected NAME=HOST:PORT")
        parties.append((name, address))
    if len({name for name, _ in parties}) != len(parties):
        raise PartyConfigError(f"--passive: duplicate party names in {_PASSIVES.value}")
    return parties


def _run_passive() -> int:
    config = PassiveConfig()
    server = PassiveServer(PassiveParty(_data("passive"), config), _ADDRESS.value).start()
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    print(json.dumps({"role": "passive", "name": config.name, "address": server.address}), flush=True)
    outcome = server.wait(_IDLE_TIMEOUT.value)
    server.stop()
    if outcome == "rejected":
        return _fail(one_line(server.error))
    if outcome == "idle":
        return _fail(f"passive {config.name}: no call for {_IDLE_TIMEOUT.value:g} s, exiting", 4)
    print(json.dumps({"role": "passive", "name": config.name, "outcome": outcome}), flush=True)
    return 0


def _run_active() -> int:
    config = ActiveConfig()
    data = _data("active")
    channels = [GrpcPassiveChannel(name, address) for name, address in _parse_passives()]
    try:
        result = train_active(data, channels, config)
    finally:
        for channel in channels:
            channel.close()
    summary = {"role": "active", "step": result.step, "total_steps": result.total_steps,
               "test_accuracy": result.test_accuracy, "train_accuracy": result.train_accuracy,
               "task_loss": result.task_loss, "passive_losses": result.passive_losses, "lost": result.lost,
               "stopped": result.stopped, "resumed_from": result.resumed_from, "checkpoint": result.checkpoint}
    print(json.dumps(summary), flush=True)
    if result.stopped:
        return _fail(f"stopped at step {result.step}: passive party lost ({', '.join(result.lost)}), "
                     f"checkpoint {result.checkpoint}", 3)
    return 0


def _run_predict() -> int:
    config = ActiveConfig()
    data = _data("active")
    predictions, test_accuracy = predict_active(data, config)
    if _PREDICTIONS_OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_PREDICTIONS_OUT.value)), exist_ok=True)
        with open(_PREDICTIONS_OUT.value, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "prediction"])
            writer.writerows(zip(data.ids.tolist(), predictions.tolist()))
    print(json.dumps({"role": "predict", "rows": len(predictions), "test_accuracy": test_accuracy,
                      "predictions": _PREDICTIONS_OUT.value}), flush=True)
    return 0


def _run_experiment() -> int:
    for result in experiments.apfed_experiments():
        print(result.table() + "\n", flush=True)
    return 0


def main(argv: list[str], extra_bindings: list[str]) -> int:
    if len(argv) > 1:
        return _fail(f"unexpected arguments: {argv[1:]}")
    if _ROLE.value is None:
        return _fail("--role is required (active, passive, predict or experiment)")
    common.quiet_library_logs()
    try:
        parse_gin(_GIN_FILES.value, [*_GIN_BINDINGS.value, *extra_bindings])
    except GinConfigError as err:
        return _fail(f"gin config error: {err}")
    runner = {"active": _run_active, "passive": _run_passive, "predict": _run_predict,
              "experiment": _run_experiment}[_ROLE.value]
    try:
        return runner()
    except PassiveUnavailableError as err:
        return _fail(f"{one_line(err)} (before training could start)")
    except _USER_ERRORS as err:
        return _fail(one_line(err))
    except OSError as err:  # e.g. the passive address is taken
        logging.error("%s", err)
        return _fail(one_line(err))


def run() -> None:
    argv, extra_bindings = split_gin_shorthand(sys.argv)
    app.run(lambda args: main(args, extra_bindings), argv=argv)


if __name__ == "__main__":
    run()
