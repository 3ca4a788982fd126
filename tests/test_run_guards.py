"""The guards around running a federation, piece by piece: who may start an open one, the
run lock, the teardown's order, and Ray's errors as fedray's at the driver's boundary.
(tests/test_lifecycle.py drives them together through real `fedray run`/`fedray demo`.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedray.bridge.addresses import is_loopback
from fedray.deploy.config_file import config_from_dict
from fedray.deploy.exposure import open_federation
from fedray.deploy.lifecycle import (
    CLIENTS,
    FEDERATION,
    LOCK,
    RAY,
    TRACKING,
    RunLock,
    Stopped,
    Teardown,
)
from fedray.errors import AlreadyRunning, ConfigError, FedrayError, SessionError


def _config(controller: str, combiners: str):
    return config_from_dict({"federation": "g", "seed_model": "s",
                             "controller": {"host": controller},
                             "combiners": {"host": combiners}}, source="g.yaml")


@pytest.mark.parametrize(("controller", "combiners", "token", "client_tokens", "insecure",
                          "verdict"), [
    ("0.0.0.0", "0.0.0.0", None, False, False, "refused"),  # the default config, no token
    ("127.0.0.1", "0.0.0.0", None, False, False, "refused"),  # one host reachable is enough
    ("0.0.0.0", "0.0.0.0", None, False, True, "warned"),  # --insecure: the operator said so
    ("127.0.0.1", "::1", None, False, False, "warned"),  # nothing off this machine reaches it
    ("localhost", "127.0.0.2", None, False, False, "warned"),
    ("0.0.0.0", "0.0.0.0", "s3cret", False, False, "silent"),
    ("0.0.0.0", "0.0.0.0", None, True, False, "silent"),  # per-client tokens close the bridge
])
def test_a_federation_anyone_could_join_starts_only_on_loopback_or_when_told(
        controller, combiners, token, client_tokens, insecure, verdict):
    config = _config(controller, combiners)
    if verdict == "refused":
        with pytest.raises(ConfigError, match=r"g.yaml: \$FEDRAY_TOKEN is not set .* --insecure"):
            open_federation(config, token, client_tokens, insecure)
        return
    warning = open_federation(config, token, client_tokens, insecure)
    assert (warning is None) == (verdict == "silent"), warning


def test_a_token_row_the_secret_does_not_vouch_for_does_not_close_the_bridge(
        store, tmp_path):
    """The guard counted raw rows (finding 1): one forged row, and `fedray run` on 0.0.0.0
    without $FEDRAY_TOKEN started with no warning while the gates stayed open."""
    from fedray.bridge.keys import load_token_secret, row_mac
    from fedray.deploy.exposure import client_tokens_vouched
    from fedray.tracking.tokens import COLLECTION, create_token

    config = config_from_dict({"federation": "g", "seed_model": "s",
                               "tracking": {"database": store.db.name}}, source="g.yaml")
    forged = {"hash": "f" * 64, "name": "mallory", "mac": "0" * 64, "revoked": False,
              "live_name": "mallory", "created_at": None, "revoked_at": None}
    store.db[COLLECTION].insert_one(forged)
    uri = f"mongodb://{store.db.client.address[0]}:{store.db.client.address[1]}/"
    assert client_tokens_vouched(uri, config, tmp_path) == (False, 1)
    with pytest.raises(ConfigError, match="--insecure"):
        open_federation(config, None, False, False)
    # A row made with this federation's secret does vouch (and the forged one still not).
    secret = load_token_secret(tmp_path)
    create_token(store, "alice", secret)
    assert client_tokens_vouched(uri, config, tmp_path) == (True, 1)
    assert row_mac(secret, "f" * 64, "mallory") != "0" * 64


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "fl.example.org", ""]))


def test_the_run_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    code = ("import sys, time; from pathlib import Path; from fedray.deploy.lifecycle import RunLock; "
            "RunLock(Path(sys.argv[1]), 'f').acquire(); print('held', flush=True); "
            "time.sleep(60)")  # behaviour: a process that holds the lock until it is killed
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning, match=f"already running from {tmp_path} "
                                                 f"\\(pid {holder.pid}\\)"):
            RunLock(tmp_path, "f").acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path, "f").acquire().release()  # the kernel dropped it with the process


def test_teardown_stops_in_order_goes_on_past_failures_and_lists_what_it_stopped():
    calls: list[str] = []
    teardown = Teardown()

    def stop(name: str, fail: bool = False):
        def call() -> None:
            calls.append(name)
            if fail:
                raise RuntimeError("boom")
        return call

    teardown.add(LOCK, "", stop("lock"))
    teardown.add(TRACKING, "tracking server", stop("tracking", fail=True))
    teardown.add(RAY, "Ray", stop("ray"))
    teardown.add(FEDERATION, "federation x", stop("federation"))
    teardown.add(CLIENTS, lambda: "2 edge clients", stop("clients"))
    assert teardown.close() == ["federation x", "2 edge clients", "tracking server", "Ray"]
    assert calls == ["federation", "clients", "tracking", "ray", "lock"]
    assert teardown.close() == []  # nothing is stopped twice
    line = Stopped(15, ["federation x", "Ray"]).line()
    assert line == "stopped by SIGTERM: federation x, Ray" and Stopped(2).exit_code == 130


def test_a_signal_raises_stopped_once_and_waits_while_the_teardown_runs():
    import signal

    from fedray.deploy.lifecycle import running

    seen: list[str] = []
    before = signal.getsignal(signal.SIGINT)  # default, or ignored in a background job
    with pytest.raises(Stopped) as info, running() as teardown:
        def stop() -> None:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while stopping: ignored
            seen.append("stopped")
        teardown.add(FEDERATION, "federation x", stop)
        assert os.environ["FEDRAY_RUN"] == teardown.run_id
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM and info.value.stopped == ["federation x"]
    assert seen == ["stopped"] and "FEDRAY_RUN" not in os.environ
    assert signal.getsignal(signal.SIGINT) is before  # restored



def test_a_signal_lost_where_python_cannot_raise_is_quiet_and_caught_at_the_next_checkpoint():
    """SIGTERM during a fork (logging's after-fork hook) printed "Exception ignored ...
    Traceback" before the one-line stop."""
    import gc
    import signal

    from fedray.deploy.lifecycle import checkpoint, running

    class Finalized:
        def __del__(self) -> None:  # where Python cannot raise: like a fork hook
            os.kill(os.getpid(), signal.SIGTERM)

    printed: list[BaseException] = []  # what Python would print as "Exception ignored"
    before = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: printed.append(unraisable.exc_value)
    try:
        with pytest.raises(Stopped) as info, running():
            Finalized()
            gc.collect()
            checkpoint()
        assert printed == []
    finally:
        sys.unraisablehook = before
    assert info.value.signum == signal.SIGTERM

@pytest.mark.integration
def test_ray_errors_become_fedray_errors_without_a_remote_traceback(ray_session):
    import ray

    from fedray.deploy.federation import ray_errors

    @ray.remote(num_cpus=0, max_restarts=0)
    class Flaky:
        def fedray(self) -> None:
            raise ConfigError("combiners.count must be greater than 0")

        def bug(self) -> None:
            raise KeyError("oops")

        def hang(self) -> None:
            import time

            time.sleep(30)  # behaviour: an actor call that hangs

    actor = Flaky.remote()
    with pytest.raises(ConfigError) as info, ray_errors("asking"):
        ray.get(actor.fedray.remote())
    assert type(info.value) is ConfigError and str(info.value) == \
        "combiners.count must be greater than 0"
    with pytest.raises(SessionError) as info, ray_errors("asking"):
        ray.get(actor.bug.remote())
    assert str(info.value) == "asking: KeyError: 'oops'"
    with pytest.raises(SessionError, match="asking: no answer in time"), ray_errors("asking"):
        ray.get(actor.hang.remote(), timeout=0.2)
    ray.kill(actor, no_restart=True)
    with pytest.raises(FedrayError) as info, ray_errors("asking"):
        ray.get(actor.bug.remote())
    assert isinstance(info.value, SessionError) and "\n" not in str(info.value)
    assert str(info.value).startswith("asking: ")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the point
def test_a_signal_whose_exception_was_swallowed_still_stops_the_command_at_a_checkpoint():
    """Python drops an exception raised by a signal handler while a finalizer runs
    ("Exception ignored"); the signal is recorded first, and the command's checkpoints
    (after starting Ray, while following a session) raise it again."""
    import signal

    from fedray.deploy.lifecycle import checkpoint, running

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs (and raises) in here

    with pytest.raises(Stopped) as info, running():
        Finalized()  # the Stopped raised inside __del__ is swallowed...
        checkpoint()  # ...and raised here
    assert info.value.signum == signal.SIGTERM
    checkpoint()  # no command running: nothing to do


def test_ray_init_keeps_the_commands_sigterm_handler(monkeypatch):
    import signal

    from ray._private import utils

    from fedray.deploy.lifecycle import ours_kept, running

    installed = []
    monkeypatch.setattr(utils, "set_sigterm_handler", installed.append)
    with running() as teardown:
        with ours_kept():
            utils.set_sigterm_handler(lambda *a: None)  # what ray.init does
        assert installed == [] and signal.getsignal(signal.SIGTERM) == teardown._on_signal


HOSTILE = ("loss[/]", "[bold]x", "acc[/bold]", "[link=http://evil]y")


def _round(metrics: dict) -> dict:
    return {"round": 1, "updates": 2, "seconds": 0.5, "model_id": "m" * 64,
            "train_metrics": metrics, "validation_metrics": {"loss[/]": 0.25}}


def test_client_chosen_metric_names_are_text_not_markup_in_round_lines():
    from rich.console import Console

    from fedray.deploy.runner import round_line

    console = Console(record=True, width=300)
    console.print(round_line(_round({name: 1.0 for name in HOSTILE}), 3))
    shown = console.export_text()
    assert all(f"train {name} 1.0000" in shown for name in HOSTILE), shown
    assert "val loss[/] 0.2500" in shown


def test_a_validation_without_a_new_model_is_not_shown_as_a_round_of_zero_updates():
    """FedBuff validates its final version: that printed 'round 6/6 · 0 updates · 0.00s'."""
    from fedray.deploy.runner import round_line

    record = {"round": 6, "updates": 0, "seconds": 0.0, "model_id": "67ccf7b5d3" + "0" * 54,
              "train_metrics": {}, "validation_metrics": {"accuracy": 0.8981}}
    assert round_line(record, 6) == "validated model 67ccf7b5d3 · val accuracy 0.8981"
    assert round_line(_round({"loss": 1.0}), 3).startswith("round 1/3 · 2 updates")


def test_fedray_status_and_the_summary_show_client_text_as_text():
    from pathlib import Path

    from rich.console import Console

    from fedray.deploy.runner import RunResult, print_summary
    from fedray.deploy.status import render

    session = {"session_id": "s1", "state": "failed", "round": 1, "round_state": "running",
               "rounds_done": 0, "rounds_planned": 2, "clients_online": 1, "model_id": "m" * 64,
               "reason": "client [bold]x failed: loss[/]", "history": [_round({"[bold]x": 2.0})]}
    status = {"federation": "f", "namespace": "fedray-f", "ray_address": "auto",
              "gateway": "g:1", "session": session, "clients_connected": 1,
              "combiners": [{"name": "combiner-0", "address": "h:2", "status": "online",
                             "clients": 1, "client_names": ["[/]", "[bold]x"]}]}
    console = Console(record=True, width=300)
    render(status, console)
    result = RunResult(status={**session, "rounds_done": 0}, data_dir=Path("/d[/]"),
                       tracking_uri="embedded", gateway="g:1")
    print_summary(result, console)
    shown = console.export_text()
    assert "[bold]x 2.0000" in shown and "val loss[/] 0.2500" in shown
    assert "[/], [bold]x" in shown
    assert shown.count("client [bold]x failed: loss[/]") == 2
    assert "--data-dir /d[/]" in shown


def test_fedray_run_json_is_valid_json_even_with_non_finite_numbers(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    import fedray.deploy.runner
    from fedray.cli.main import main
    from fedray.deploy.runner import RunResult

    record = {**_round({"loss": float("inf")}), "report": {"epsilon": float("inf")},
              "validation_metrics": {"acc": float("nan")}}
    status = {"session_id": "s1", "state": "finished", "rounds_done": 1, "rounds_planned": 1,
              "model_id": "m" * 64, "history": [record]}
    monkeypatch.setattr(fedray.deploy.runner, "run_federation", lambda config, **_: RunResult(
        status=status, data_dir=tmp_path, tracking_uri="embedded", gateway="g:1"))
    config = tmp_path / "f.yaml"
    config.write_text("federation: f\nseed_model: s.safetensors\n")
    result = CliRunner().invoke(main, ["run", str(config), "--json"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert summary["history"][0]["train_metrics"] == {"loss": None}
    assert summary["history"][0]["validation_metrics"] == {"acc": None}


@pytest.mark.parametrize(("address", "needle"), [
    ("local", "cannot start a local Ray: no room; check ray.num_cpus"),
    ("auto", "cannot join Ray at auto: no cluster; is a cluster running there"),
])
def test_a_failing_ray_init_is_one_line_with_a_hint(monkeypatch, address, needle):
    import ray

    from fedray.config import RayConfig
    from fedray.deploy.federation import connect_ray
    from fedray.errors import TransportError

    error = RuntimeError("no room\nand a long Ray trace") if address == "local" \
        else ConnectionError("no cluster")

    def init(**kwargs):
        raise error

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(TransportError) as info:
        connect_ray(RayConfig(address=address), "fedray-x")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_an_unreachable_ray_address_fails_fast_instead_of_retrying(monkeypatch):
    import time

    import ray
    from netutil import free_ports

    from fedray.config import RayConfig
    from fedray.deploy.federation import connect_ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init was called"))
    start = time.monotonic()
    with pytest.raises(FedrayError, match=r"no Ray cluster answers at 127\.0\.0\.1:"):
        connect_ray(RayConfig(address=f"127.0.0.1:{free_ports(1)[0]}"), "fedray-x")
    assert time.monotonic() - start < 15


def test_fedray_status_with_no_cluster_there_is_one_line_and_not_running_s_code(monkeypatch):
    from click.testing import CliRunner
    from netutil import free_ports

    from fedray.cli.main import main
    from fedray.errors import NotRunning

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_ports(1)[0]
    result = CliRunner().invoke(main, ["status", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == NotRunning.exit_code == 23, result.output
    assert result.output.startswith("fedray: error: no Ray cluster answers at ")
    assert result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("value", [0, -2])
def test_ray_num_cpus_is_checked_at_load(value):
    with pytest.raises(ConfigError, match=f"g.yaml: ray.num_cpus must be at least 1 .*got {value}"):
        config_from_dict({"federation": "g", "seed_model": "s", "ray": {"num_cpus": value}},
                         source="g.yaml")
