"""Training curves: ``fedray.tracking.plot`` from round records, `fedray plot` against tracking, and
the curve `fedray demo` draws. PNGs are checked by their header, not by pixels."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from fedray.errors import FedrayError
from fedray.tracking.plot import curve_title, is_loss_like, metric_name, plot_rounds, series_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(rounds: int) -> list[dict[str, Any]]:
    return [
        {"round": r, "updates": 4, "seconds": 0.1, "model_id": f"{r:064x}",
         "train_metrics": {"train_loss": 2.0 * math.exp(-r / 3), "train_accuracy": 1 - 0.5 / r},
         "validation_metrics": {"loss": 2.2 * math.exp(-r / 3), "accuracy": 0.95 - 0.5 / r}}
        for r in range(1, rounds + 1)
    ]  # fmt: skip


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_rounds_writes_a_two_panel_png(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "curve.png"

    result = plot_rounds(_records(10), out, title=curve_title("digits", "0123abcd", "finished"),
                         subtitle="10 of 10 rounds done")  # fmt: skip

    assert result == out
    width, height = _png_size(out)
    assert 1000 <= width <= 1600 and 400 <= height <= 700  # two panels side by side
    assert 20_000 < out.stat().st_size < 1_000_000


@pytest.mark.parametrize(
    "records",
    [
        _records(1),  # one round: markers, no line
        [{"round": 1, "train_metrics": {}, "validation_metrics": {}}],  # no metrics
        [],  # no rounds yet
        [{"round": 2, "train_metrics": {"accuracy": 0.5}},
         {"round": 3, "status": "failed"},
         {"round": 4, "train_metrics": {"accuracy": float("nan")},
          "validation_metrics": {"accuracy": 0.7, "note": "text"}}],  # gaps, junk values
    ],
    ids=["one-round", "no-metrics", "no-rounds", "gaps"],
)
def test_plot_rounds_copes_with_thin_data(tmp_path: Path, records: list[dict[str, Any]]) -> None:
    out = tmp_path / "curve.png"

    plot_rounds(records, out)

    width, height = _png_size(out)
    assert width > 300 and height > 300


def test_series_pair_train_and_validation_metrics() -> None:
    records = [
        {"round": 1, "train_metrics": {"train_loss": 1.0, "ok": True},
         "validation_metrics": {"val_loss": 1.5, "accuracy": 0.5}},
        {"round": 2, "train_metrics": {"train_loss": float("inf")},
         "validation_metrics": {"val_loss": 1.2, "accuracy": 0.6}},
        {"round": "3", "train_metrics": {"train_loss": 0.1}},
    ]  # fmt: skip

    series = {(s.metric, s.kind): (s.rounds, s.values) for s in series_of(records)}

    assert series == {
        ("loss", "train"): ((1,), (1.0,)),
        ("loss", "validation"): ((1, 2), (1.5, 1.2)),
        ("accuracy", "validation"): ((1, 2), (0.5, 0.6)),
    }


@pytest.mark.parametrize(
    ("name", "loss_like"),
    [("loss", True), ("val_loss", True), ("MSE", True), ("error_rate", True),
     ("accuracy", False), ("f1", False), ("auc", False)],
)  # fmt: skip
def test_is_loss_like(name: str, loss_like: bool) -> None:
    assert is_loss_like(name) is loss_like


def test_metric_name_drops_kind_prefixes() -> None:
    assert [metric_name(n) for n in ("train_loss", "val.acc", "test-f1", "train_", "trainer")] \
        == ["loss", "acc", "f1", "train_", "trainer"]  # fmt: skip


def test_unwritable_output_is_a_fedray_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(FedrayError, match="cannot write the plot"):
        plot_rounds(_records(2), tmp_path / "file" / "curve.png")


def test_demo_curve_includes_held_out_accuracy(tmp_path: Path) -> None:
    from fedray.deploy.demo import plot_curve
    from fedray.deploy.runner import RunResult

    status = {"session_id": "0123456789abcdef", "state": "finished", "rounds_done": 3,
              "rounds_planned": 3, "model_id": "m", "history": _records(3)}  # fmt: skip
    result = RunResult(status=status, data_dir=tmp_path, tracking_uri="", gateway="")
    console = Console(record=True, width=200)

    path = plot_curve(result, [0.8, 0.9, 0.93], tmp_path / "curve.png", console)

    assert path == tmp_path / "curve.png" and _png_size(path)[0] > 1000
    assert f"training curve: {path}" in console.export_text()


# `fedray plot` against a real embedded tracking server


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose embedded tracking holds two sessions (the newer one failed)."""
    from fedray.tracking.documents import written_at
    from fedray.tracking.embedded import EmbeddedMongo
    from fedray.tracking.store import TrackingStore

    server = EmbeddedMongo(tmp_path).start()
    store = TrackingStore.from_uri(server.uri)
    try:
        store.ensure_indexes()
        t0 = datetime(2030, 1, 1, tzinfo=UTC)
        for i, (sid, status, rounds) in enumerate(
            (("aaaa0000bbbb1111", "finished", 4), ("cccc2222dddd3333", "failed", 1))
        ):
            with written_at(t0 + timedelta(minutes=i)):
                store.create_session(sid, "digits", {}, 4, "0" * 64)
            store.update_session(sid, status=status, rounds_done=rounds)
            for record in _records(rounds):
                store.start_round(sid, record["round"])
                store.update_round(sid, record["round"], status="finished", **{
                    k: record[k] for k in ("train_metrics", "validation_metrics", "seconds")})
        store.close()
        yield tmp_path
    finally:
        server.stop()


def test_plot_cli_draws_the_latest_or_the_named_session(federation: Path) -> None:
    from fedray.cli.main import main

    runner = CliRunner()
    latest = runner.invoke(main, ["plot", "--data-dir", str(federation),
                                  "-o", str(federation / "latest.png")])  # fmt: skip
    named = runner.invoke(main, ["plot", "--data-dir", str(federation), "--session", "AAAA0000",
                                 "-o", str(federation / "named.png")])  # fmt: skip
    unknown = runner.invoke(main, ["plot", "--data-dir", str(federation), "--session", "eeee",
                                   "-o", str(federation / "none.png")])  # fmt: skip

    assert latest.exit_code == 0, latest.output
    assert "session cccc2222dddd3333 of digits (failed), 1 rounds" in latest.output
    assert named.exit_code == 0, named.output
    assert "session aaaa0000bbbb1111 of digits (finished), 4 rounds" in named.output
    assert "train accuracy, train loss, validation accuracy, validation loss" in named.output
    assert _png_size(federation / "named.png")[0] > 1000
    assert _png_size(federation / "latest.png")[0] > 1000
    assert unknown.exit_code == 2 and "no session id starts with it" in unknown.output
    assert not (federation / "none.png").exists()


def test_plot_cli_without_sessions(tmp_path: Path) -> None:
    from fedray.cli.main import main

    (tmp_path / "tracking").mkdir()  # a federation's data directory, nothing run yet
    result = CliRunner().invoke(main, ["plot", "--data-dir", str(tmp_path),
                                       "-o", str(tmp_path / "c.png")])  # fmt: skip

    assert result.exit_code == 2 and "no session in tracking" in result.output
