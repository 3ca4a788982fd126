"""A model store in an S3 bucket (MinIO, SeaweedFS, AWS, ...) through the ``minio`` client.

Configured by one URI, ``s3://BUCKET?endpoint=HOST:PORT&secure=false`` with optional
``region=``, ``prefix=`` (or ``s3://BUCKET/PREFIX``), ``access_key=`` and ``secret_key=``.
Keys not in the URI come from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and
``AWS_SESSION_TOKEN``), else ``MINIO_ROOT_USER``/``MINIO_ROOT_PASSWORD``.

Objects are named ``<prefix>models/<id[:2]>/<id>.safetensors`` and carry the sha256 of
their bytes in ``x-amz-meta-sha256``: an S3 ETag is not a content hash once an upload is
multipart, so the metadata is what ``put`` checks to skip bytes that are already there.
``get`` hashes every byte it returns. The bucket is created on the first ``put`` if it is
missing. Every minio/urllib3 exception is translated here, once, into a StorageError that
says what to check; the HTTP pool has short connect timeouts and few retries, so a dead
endpoint fails in seconds rather than minutes.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from fedray.errors import ConfigError, StorageError
from fedray.storage.base import ModelBytes, ModelStore, check_model_id, sha256_hex

SUFFIX = ".safetensors"
META_SHA256 = "sha256"  # sent as the x-amz-meta-sha256 header
PART_SIZE = 16 * 1024 * 1024  # multipart above this; 3 parts in flight (see put)
PARALLEL_PARTS = 3
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0
RETRIES = 2

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PARAMS = {"endpoint", "secure", "region", "prefix", "access_key", "secret_key"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}
_KEYS_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                 "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` storage URI; ``display`` is the URI without its keys."""

    bucket: str
    endpoint: str
    secure: bool
    region: str | None
    prefix: str
    access_key: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False)
    display: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """Parse ``storage.uri``; a bad value raises ConfigError naming the field."""
        parsed = urlparse(uri)

        def bad(why: str) -> ConfigError:
            return ConfigError(f"storage.uri: {_redact(uri)!r}: {why} (expected "
                               "s3://BUCKET?endpoint=HOST:PORT&secure=false)")

        if parsed.scheme != "s3":
            raise bad("not an s3:// URI")
        bucket = parsed.netloc
        if "@" in bucket:
            raise bad("put keys in access_key=/secret_key= or the environment, not before '@'")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise bad(f"{bucket!r} is not a valid bucket name (3-63 lowercase letters, "
                      "digits, '.' and '-')")
        params: dict[str, str] = {}
        for part in filter(None, parsed.query.split("&")):
            name, _, value = part.partition("=")
            if name not in _PARAMS:
                raise bad(f"unknown parameter {name!r}; known: {', '.join(sorted(_PARAMS))}")
            params[name] = unquote(value)  # not unquote_plus: secret keys contain '+'
        secure = None
        if "secure" in params:
            text = params["secure"].lower()
            if text not in _TRUE | _FALSE:
                raise bad(f"secure must be true or false, got {params['secure']!r}")
            secure = text in _TRUE
        endpoint = params.get("endpoint", "s3.amazonaws.com")
        scheme, sep, rest = endpoint.partition("://")
        if sep:
            if scheme not in ("http", "https"):
                raise bad(f"endpoint {endpoint!r} must be HOST:PORT (or http(s)://HOST:PORT)")
            if secure is not None and secure != (scheme == "https"):
                raise bad(f"endpoint {endpoint!r} contradicts secure={params['secure']}")
            secure, endpoint = scheme == "https", rest.rstrip("/")
        if not endpoint or "/" in endpoint:
            raise bad(f"endpoint {endpoint!r} must be HOST:PORT")
        path_prefix = parsed.path.strip("/")
        if path_prefix and params.get("prefix"):
            raise bad("give the prefix either as a path or as prefix=, not both")
        prefix = (path_prefix or params.get("prefix", "")).strip("/")
        access_key, secret_key = params.get("access_key"), params.get("secret_key")
        session_token = None
        if (access_key is None) != (secret_key is None):
            raise bad("access_key and secret_key must be given together")
        if access_key is None:
            access_key, secret_key, session_token = _keys_from_env()
        return cls(bucket=bucket, endpoint=endpoint, secure=True if secure is None else secure,
                   region=params.get("region") or None, prefix=f"{prefix}/" if prefix else "",
                   access_key=access_key, secret_key=secret_key, session_token=session_token,
                   display=_redact(uri))


def _keys_from_env() -> tuple[str | None, str | None, str | None]:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                env.get("AWS_SESSION_TOKEN") or None)
    if env.get("MINIO_ROOT_USER") and env.get("MINIO_ROOT_PASSWORD"):
        return env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"], None
    return None, None, None  # anonymous: fine for a public bucket, refused for writes


def _redact(uri: str) -> str:
    """``uri`` without the values of access_key/secret_key (safe for messages and logs)."""
    return re.sub(r"((?:^|[?&])(?:access_key|secret_key)=)[^&#]*", r"\1***", uri)


class _ViewReader:
    """A read()-able view over the caller's buffer: minio copies one part at a time."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def read(self, size: int = -1) -> bytes:
        end = self.view.nbytes if size is None or size < 0 else min(self.pos + size,
                                                                    self.view.nbytes)
        chunk = bytes(self.view[self.pos:end])
        self.pos = end
        return chunk


class S3ModelStore(ModelStore):
    """Content-addressed model bytes in an S3 bucket, verified on every read."""

    def __init__(self, location: S3Location) -> None:
        self.location = loc = location
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            maxsize=max(10, PARALLEL_PARTS * 2),
            cert_reqs="CERT_REQUIRED",  # CA bundle as minio's own default client picks it
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=RETRIES, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(loc.endpoint, access_key=loc.access_key, secret_key=loc.secret_key,
                            session_token=loc.session_token, secure=loc.secure,
                            region=loc.region, http_client=http)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @classmethod
    def from_uri(cls, uri: str) -> S3ModelStore:
        return cls(S3Location.parse(uri))

    def __repr__(self) -> str:
        return f"S3ModelStore({self.location.display!r})"

    @property
    def bucket(self) -> str:
        return self.location.bucket

    def key(self, model_id: str) -> str:
        """The object name of ``model_id`` (validated, always under the prefix)."""
        check_model_id(model_id)
        return f"{self.location.prefix}models/{model_id[:2]}/{model_id}{SUFFIX}"

    def uri(self, model_id: str) -> str:
        return f"s3://{self.bucket}/{self.key(model_id)}"

    def put(self, data: ModelBytes) -> str:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        model_id = sha256_hex(view)
        key = self.key(model_id)
        with self._errors(f"store model {model_id} as {self.uri(model_id)}"):
            self._ensure_bucket()
            if self._holds(key, model_id, view.nbytes):
                return model_id
            self.client.put_object(self.bucket, key, _ViewReader(view), view.nbytes,
                                   metadata={META_SHA256: model_id}, part_size=PART_SIZE,
                                   num_parallel_uploads=PARALLEL_PARTS)
        return model_id

    def get(self, model_id: str) -> bytes:
        key = self.key(model_id)
        with self._errors(f"read model {model_id} from {self.uri(model_id)}"):
            try:
                response = self.client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING:
                    raise StorageError(f"model {model_id} not found in {self.uri(model_id)}"
                                       ) from None
                raise
            try:
                data = response.read()
            finally:
                response.close()
                response.release_conn()
        return self.verify(model_id, data)

    def exists(self, model_id: str) -> bool:
        key = self.key(model_id)
        with self._errors(f"look up model {model_id} in {self.uri(model_id)}"):
            return self._stat(key) is not None

    def _stat(self, key: str):
        try:
            return self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise

    def _holds(self, key: str, model_id: str, size: int) -> bool:
        """Whether the object at ``key`` says it holds ``model_id`` (so put can skip)."""
        stat = self._stat(key)
        if stat is None or stat.size != size:
            return False
        meta = stat.metadata or {}
        return meta.get(f"x-amz-meta-{META_SHA256}") == model_id

    def _ensure_bucket(self) -> None:
        with self._bucket_lock:
            if self._bucket_ready:
                return
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket, location=self.location.region)
                except S3Error as exc:
                    if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise StorageError(
                            f"bucket {self.bucket} does not exist at {self.location.endpoint} and "
                            f"cannot be created ({exc.code}: {exc.message}); create it, or use "
                            "keys that may create buckets") from None
            self._bucket_ready = True

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate minio/urllib3 failures into one StorageError telling what to check."""
        loc = self.location
        where = f"{'https' if loc.secure else 'http'}://{loc.endpoint}"
        try:
            yield
        except S3Error as exc:
            if exc.code in _KEYS_REFUSED:
                hint = ("check the keys (access_key/secret_key in storage.uri, or "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and that they may use bucket "
                        f"{loc.bucket}")
            else:
                hint = f"check bucket {loc.bucket} and the server's logs"
            raise StorageError(f"cannot {action}: S3 at {where} said {exc.code}: {exc.message}; "
                               f"{hint}") from None
        except (ServerError, InvalidResponseError) as exc:
            raise StorageError(f"cannot {action}: {where} did not answer like S3 ({_short(exc)}); "
                               "is the endpoint an S3 server, and is secure=true/false right?"
                               ) from None
        except (urllib3.exceptions.HTTPError, MinioException, OSError, ValueError) as exc:
            raise StorageError(f"cannot {action}: {where} is unreachable or broke off "
                               f"({_short(exc)}); is the endpoint right and the server running, "
                               "and is secure=true/false right?") from None


def _short(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc  # urllib3 wraps the cause in MaxRetryError
    last = reason.args[-1] if reason.args else None
    text = (last if isinstance(last, str) else str(reason)) or type(reason).__name__
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")):
        text = text.partition("): ")[2] or text  # drop urllib3's connection repr
    return text if len(text) <= 240 else text[:237] + "..."
