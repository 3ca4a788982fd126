"""`fedray plot`: a session's training and validation curves from tracking, as a PNG
(drawn by ``fedray.tracking.plot``)."""

from __future__ import annotations

from pathlib import Path

import click

from fedray.cli.common import TRACKING_MODULES, tracking, tracking_options
from fedray.cli.extras import needs


@click.command()
@click.option("--session", default=None, metavar="ID",
              help="A session id or its first characters (default: the latest session).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("curve.png"), show_default=True, help="The PNG file to write.")
@tracking_options
@needs("fedray plot", "server", modules=(*TRACKING_MODULES, "matplotlib"))
def plot(session: str | None, output: Path, data_dir: Path | None,
         tracking_uri: str | None, database: str | None) -> None:
    """Draw a session's training and validation curves, round by round, into a PNG."""
    from fedray.tracking.plot import plot_session

    with tracking(data_dir, tracking_uri) as uri:
        info = plot_session(uri, output, session=session, database=database)
    shown = ", ".join(info.metrics) or "no metrics yet"
    click.echo(f"wrote {info.path}: session {info.session_id} of {info.federation} "
               f"({info.status}), {info.rounds} rounds; {shown}")
