"""`fedray models get ID|PREFIX|latest -o FILE`: a committed model out of the model store.

The reference is resolved in tracking (``fedray.tracking.models``); the bytes come from
the model store, which checks that they hash to the model id (a corrupted model is refused,
exit code 5); then they are written as safetensors (the very bytes), npz, torch or keras
(``fedray.frameworks.formats``). Which store: ``--storage`` (a ``storage.uri``), else where tracking
recorded the model when that is a folder, else ``<data-dir>/models``. A full id with
``--storage`` needs no tracking at all.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import click

from fedray.cli.common import TRACKING_MODULES, default_data_dir, tracking, tracking_options
from fedray.cli.extras import needs
from fedray.errors import ConfigError
from fedray.frameworks.formats import FORMATS, format_for, writer


@click.command("get")
@click.argument("ref", metavar="ID|PREFIX|latest")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="File format (default: npz for a .npz output, else safetensors); fedn: "
                   "FEDn's numpy-helper npz, for a model that started from a FEDn seed.")
@click.option("--model", "build", default=None, metavar="MODULE:FUNCTION",
              help="torch/keras: a function that builds the model; the arrays are loaded into "
                   "it (checked), and keras saves the whole model as a .keras file.")
@click.option("--session", default=None, metavar="ID",
              help="With latest: that session's newest model (an id or its first characters).")
@tracking_options
@click.option("--storage", default=None, metavar="URI",
              help="The federation's storage.uri, e.g. s3://BUCKET?endpoint=HOST:9000 (default: "
                   "where tracking recorded the model, else <data-dir>/models).")
@needs("fedray models get", "server", modules=TRACKING_MODULES)
def get(ref: str, output: Path, fmt: str | None, build: str | None, session: str | None,
        data_dir: Path | None, tracking_uri: str | None, database: str | None,
        storage: str | None) -> None:
    """Write a committed model (its sha256 checked against its id) to a file."""
    from fedray.storage.base import is_model_ref
    from fedray.tracking.models import CommittedModel

    fmt = format_for(output, fmt)
    builder = None
    if build is not None:
        from fedray.strategies import load_object

        builder = load_object(build, "--model")
        if not callable(builder):
            raise ConfigError(f"--model {build}: not a function")
    write = writer(fmt, builder, output)  # what cannot be written is refused before a download
    ref = ref.strip().lower()
    if len(ref) == 64 and is_model_ref(ref) and storage is not None and session is None:
        model = CommittedModel(ref)  # the store alone can serve it
    else:
        model = _resolve(ref, session, data_dir, tracking_uri, database)
    store = model_store(model, storage, data_dir)
    data = store.get(model.model_id)  # StorageError if missing or corrupt
    write(data, output)
    click.echo(f"wrote {output} ({fmt}, {len(data) / 1e6:.2f} MB): {model.describe()}, "
               "sha256 verified")


def _resolve(ref: str, session: str | None, data_dir: Path | None, tracking_uri: str | None,
             database: str | None = None):
    from fedray.tracking.models import resolve_model
    from fedray.tracking.store import TrackingStore

    with tracking(data_dir, tracking_uri) as uri:
        store = TrackingStore.from_uri(uri, database)
        try:
            return resolve_model(store, ref, session=session, what=f"fedray models get {ref}")
        finally:
            store.close()


def model_store(model, storage: str | None, data_dir: Path | None):
    """The store to read ``model`` from (see the module docstring)."""
    from fedray.storage import FileModelStore, open_model_store

    if storage is not None:
        return open_model_store(storage, data_dir or (default_data_dir() if storage.strip()
                                                      in ("", "file") else Path(".")))
    recorded = urlparse(model.storage_uri) if model.storage_uri else None
    if recorded is not None and recorded.scheme == "file":
        path = Path(unquote(recorded.path))
        if path.is_file():
            return FileModelStore(path.parent.parent)  # root/<id[:2]>/<id>.safetensors
    if recorded is not None and recorded.scheme == "s3":
        bucket = recorded.netloc
        raise ConfigError(f"{model.describe()} is in {model.storage_uri}: pass the "
                          f"federation's storage.uri, e.g. --storage "
                          f"'s3://{bucket}?endpoint=HOST:9000'")
    return open_model_store("file", data_dir or default_data_dir())
