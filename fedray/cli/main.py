"""The `fedray` command: the group, its error handling and exit codes.

The commands live one module per group beside this one (``run``, ``serve``, ``sessions``,
``status``, ``query``, ``models``, ``tokens``, ``clients``, ``package``, ``plot``; the edge's in ``fedray.edge.cli``); this
module only puts them together. User mistakes end as one line on stderr and the stable
exit code of their ``FedrayError`` (the registry is ``fedray.errors``); a traceback is
printed only for a bug in fedray itself (exit code 70). Server-side imports (Ray, pymongo)
stay inside the commands that need them, and each such command first checks that its
extra is installed (``fedray.cli.extras``): on an edge-only install it says which one in
one line and exits with ``MissingExtra``'s code.
"""

from __future__ import annotations

import sys
import traceback

import click

from fedray.cli.clients import client
from fedray.cli.dashboard import dashboard
from fedray.cli.extras import hint_for
from fedray.cli.package import package
from fedray.cli.plot import plot
from fedray.cli.query import QUERIES
from fedray.cli.run import demo, run
from fedray.cli.serve import down, serve
from fedray.cli.sessions import session
from fedray.cli.status import status
from fedray.cli.tokens import token
from fedray.deploy.lifecycle import Stopped
from fedray.edge.cli import edge
from fedray.errors import FedrayError, MissingExtra

INTERNAL_ERROR = 70


class FedrayGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MissingExtra as exc:  # the message is the whole hint
            click.echo(str(exc), err=True)
            sys.exit(exc.exit_code)
        except FedrayError as exc:
            click.echo(f"fedray: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Stopped as exc:  # SIGINT/SIGTERM to run or demo: what it stopped, in one line
            click.echo(f"fedray: {exc.line()}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("fedray: interrupted", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in fedray: show it whole
            line = hint_for(f"fedray {ctx.invoked_subcommand or ''}".rstrip(), exc) \
                if isinstance(exc, ModuleNotFoundError) else None
            if line is not None:  # an extra's module, imported past the checks
                click.echo(line, err=True)
                sys.exit(MissingExtra.exit_code)
            traceback.print_exc()
            click.echo("fedray: internal error (a bug in fedray; please report the trace above)",
                       err=True)
            sys.exit(INTERNAL_ERROR)


@click.group(cls=FedrayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedray")
def main() -> None:
    """fedray: federated learning on Ray, with edge clients that only dial out."""


for _command in (edge, status, run, serve, session, down, dashboard, demo, package, *QUERIES,
                 plot, token, client):
    main.add_command(_command)


if __name__ == "__main__":
    main()
