"""One way to reach bytes at any store URI: a plain path, `file://`, `s3://`, `gs://`, `az://`.

`resolve(uri)` gives a pyarrow filesystem and the path inside it; shards, experts and the catalog's
pre-flight check go through it, so a new backend is one branch here. Credentials and endpoints come
from each store's standard variables in *this* process's environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, ...): a Dask worker resolves the same URI
with its own environment, and no secret ever travels in a task argument. Every request has the
PROBEX_HTTP_* connect/read timeouts and retry count.

`publish(fs, path, data)` is the one atomic write. On a local disk the bytes go to a temporary
name beside the final one (`.<name>.<random>.tmp`), then are renamed. On an object store an object
becomes visible only when its upload completes, so an object below the multipart threshold is one
PUT straight to its final key (all or nothing: one request instead of the six a temporary key and
a server-side copy cost); a larger one is a multipart upload, whose completion is the client's
call, so it goes to a temporary key first and is copied to the final key once whole. Readers skip
names starting with "." (`visible`), so a killed writer's leftovers are never mistaken for data.

Object-store failures become a `StorageError` (a ProbexError: one line in the CLI) that names the
setting and the variable to fix: a bucket that does not exist, refused credentials, an endpoint
that does not answer.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import uuid
from datetime import timedelta
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from probex_core.errors import ProbexError
from probex_core.settings import HttpSettings

OBJECT_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
TMP_SUFFIX = ".tmp"
SINGLE_PUT_MAX = 5 * 2**20  # S3's smallest multipart part; pyarrow starts multipart only above it
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one wins (AWS SDK rule)


class StorageError(ProbexError):
    """A store (shards, catalog, experts) cannot be reached or used; the message names the
    setting and the variable to fix."""


def scheme_of(uri: str | os.PathLike) -> str:
    """"" for a local path (plain or file://), else the store kind: "s3", "gs" or "az"."""
    text = os.fspath(uri)
    if "://" not in text:
        return ""
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return ""
    if scheme not in OBJECT_SCHEMES:
        raise StorageError(f"{text}: unknown store scheme {scheme!r}; use a folder, file://, s3://, gs:// or az://")
    return OBJECT_SCHEMES[scheme]


def is_local(uri: str | os.PathLike) -> bool:
    return scheme_of(uri) == ""


def local_path(uri: str | os.PathLike) -> str:
    """The absolute folder of a plain path or a file:// URI."""
    text = os.fspath(uri)
    if text.lower().startswith("file://"):
        text = unquote(urlsplit(text).path)
    return os.path.abspath(os.path.expanduser(text))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a path or a URI alike (os.path.join would eat a URI's `//`)."""
    text = os.fspath(base)
    return "/".join([text.rstrip("/")] + [p.strip("/") for p in parts]) if parts else text


def resolve(uri: str | os.PathLike, setting: str = "the store URI") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a store URI. An object store's bucket is checked once per
    process (one HEAD), so a missing bucket, wrong credentials or a dead endpoint fail here with
    one line naming `setting`, before anything is written."""
    text = os.fspath(uri)
    kind = scheme_of(text)
    if kind == "":
        return pafs.LocalFileSystem(), local_path(text)
    parts = urlsplit(text)
    bucket, key = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise StorageError(f"{setting} ({text}) names no bucket; use {kind}://bucket/prefix")
    fs = _filesystem(kind, _env_key(kind))
    _check_bucket(fs, bucket, text, setting, _env_key(kind))
    return fs, f"{bucket}/{key}" if key else bucket


def _env_key(kind: str) -> tuple:
    """What a filesystem is built from: the store's variables (the secret only as a digest, so the
    cache key never holds it) and the timeouts. A changed environment builds a new one."""
    env = os.environ
    names = {"s3": ENDPOINT_VARS + ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_PROFILE"),
             "gs": ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"),
             "az": ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")}[kind]
    secret = env.get("AWS_SECRET_ACCESS_KEY", "") + env.get("AWS_SESSION_TOKEN", "") + env.get("AZURE_STORAGE_ACCOUNT_KEY", "")
    http = HttpSettings.from_env(env)
    return (tuple(env.get(n) for n in names), hashlib.sha256(secret.encode()).hexdigest(),
            http.connect_timeout_s, http.read_timeout_s, http.max_retries)


def endpoint() -> str | None:
    """The S3 endpoint the environment names (None: AWS itself)."""
    return next((os.environ[n] for n in ENDPOINT_VARS if os.environ.get(n)), None)


@functools.lru_cache(maxsize=16)
def _filesystem(kind: str, env_key: tuple) -> pafs.FileSystem:
    http = HttpSettings.from_env()
    if kind == "s3":
        # allow_delayed_open: a stream sends nothing until it knows its size, so a small object is
        # one PutObject, not a create/upload/complete multipart triple.
        kw = dict(connect_timeout=http.connect_timeout_s, request_timeout=http.read_timeout_s,
                  allow_delayed_open=True,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=http.max_retries + 1))
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        url = endpoint()
        if url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                var = next(n for n in ENDPOINT_VARS if os.environ.get(n))
                raise StorageError(f"{var}={url!r} is not an http(s) URL; set it to e.g. http://127.0.0.1:9000")
            kw.update(scheme=parts.scheme, endpoint_override=parts.netloc + parts.path.rstrip("/"))
        # Credentials: the AWS SDK's own chain (env vars, profile, instance role), never an argument.
        return pafs.S3FileSystem(**kw)
    if kind == "gs":
        # GCS retries transient errors until this limit; the client's own timeouts bound each try.
        return pafs.GcsFileSystem(retry_time_limit=timedelta(
            seconds=(http.connect_timeout_s + http.read_timeout_s) * (http.max_retries + 1)))
    account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME") or os.environ.get("AZURE_STORAGE_ACCOUNT")
    if not account:
        raise StorageError("an az:// store needs AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ACCOUNT_KEY, "
                           "or a credential the Azure SDK finds)")
    key = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY")
    return pafs.AzureFileSystem(account, account_key=key) if key else pafs.AzureFileSystem(account)


_CHECKED: set[tuple] = set()


def _check_bucket(fs: pafs.FileSystem, bucket: str, uri: str, setting: str, env_key: tuple) -> None:
    if (bucket, env_key) in _CHECKED:
        return
    with translate(uri, setting):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"the bucket {bucket!r} of {setting} ({uri}) does not exist"
                           f"{' at ' + endpoint() if endpoint() and uri.startswith('s3') else ''}; "
                           f"create it, or set {setting} to a bucket that exists")
    _CHECKED.add((bucket, env_key))


# pyarrow's messages carry the SDK's error name: the kind of fault, and so the variable to fix.
_CREDENTIALS = re.compile(r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|InvalidAccessKeyId|"
                          r"SignatureDoesNotMatch|AccessDenied|EXPIRED_TOKEN|UNRECOGNIZED_CLIENT|"
                          r"MISSING_AUTHENTICATION_TOKEN|No credentials|Unauthorized|PERMISSION_DENIED|"
                          r"AuthenticationFailed|AuthorizationFailure", re.I)
_UNREACHABLE = re.compile(r"NETWORK_CONNECTION|curlCode|Could not connect|Couldn't connect|Timeout was reached|"
                          r"Connection refused|timed out|UNAVAILABLE|Could not resolve host", re.I)
_NO_BUCKET = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist|ContainerNotFound", re.I)


def explain(error: OSError, uri: str, setting: str) -> StorageError | None:
    """A one-line StorageError for an object-store failure, or None for anything else (a local
    OSError or a missing file keeps its own type)."""
    if isinstance(error, FileNotFoundError) or is_local(uri):
        return None
    text = str(error)
    reason = _short(text)
    if _NO_BUCKET.search(text):
        return StorageError(f"the bucket of {setting} ({uri}) does not exist ({reason}); create it, "
                            f"or set {setting} to a bucket that exists")
    if _CREDENTIALS.search(text):
        vars_ = {"s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)",
                 "gs": "GOOGLE_APPLICATION_CREDENTIALS", "az": "AZURE_STORAGE_ACCOUNT_KEY"}[scheme_of(uri)]
        return StorageError(f"the object store refused the credentials for {setting} ({uri}) ({reason}); "
                            f"check {vars_} and the bucket's permissions")
    if _UNREACHABLE.search(text):
        where = f" at {endpoint()}" if scheme_of(uri) == "s3" and endpoint() else ""
        return StorageError(f"cannot reach the object store of {setting} ({uri}){where} ({reason}); "
                            "check AWS_ENDPOINT_URL (or the store's endpoint) and that it is up; "
                            "PROBEX_HTTP_CONNECT_TIMEOUT / PROBEX_HTTP_READ_TIMEOUT bound each try")
    return StorageError(f"the object store failed for {setting} ({uri}): {reason}")


def _short(text: str) -> str:
    """The SDK's error name and first sentence, on one line."""
    m = re.search(r"AWS Error (\w+)[^:]*:\s*([^.(;]*)", text)
    out = f"{m.group(1)}: {m.group(2).strip()}" if m else text
    out = " ".join(out.split())
    return out[:200]


class translate:
    """`with translate(uri, setting):` turns an object store's OSError into a StorageError."""

    def __init__(self, uri: str | os.PathLike, setting: str):
        self.uri, self.setting = os.fspath(uri), setting

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError):
            better = explain(error, self.uri, self.setting)
            if better is not None:
                raise better from None
        return False


def visible(name: str) -> bool:
    """A name a reader may see: not a temporary object of a writer (".name.xxxx.tmp")."""
    return not name.startswith(".")


def tmp_name(path: str) -> str:
    head, _, name = path.rstrip("/").rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def publish(fs: pafs.FileSystem, path: str, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` atomically (see the module's docstring for how, per store).

    durable: fsync before the rename (local disks; an object store's PUT is durable when it
    returns). A failure removes the temporary object and leaves `path` as it was."""
    if not isinstance(fs, pafs.LocalFileSystem) and len(data) < SINGLE_PUT_MAX:
        # The stream buffers `data` in memory and sends it as one PutObject on close: the server
        # stores the object only once every byte of the declared length has arrived.
        f = fs.open_output_stream(path)
        f.write(data)
        f.close()
        return
    tmp = tmp_name(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove(fs, tmp)
            raise
        return
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        # A server-side copy: `path` appears whole or not at all (no multipart upload is ever
        # completed under the final key with part of the bytes).
        fs.move(tmp, path)
    except BaseException:
        _remove(fs, tmp)
        raise


def _remove(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:  # already gone, or the store is unreachable: a reader skips it either way
        pass


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def listdir(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """What a reader may see under `path` (temporary objects skipped); [] when it does not exist."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return [i for i in infos if visible(i.base_name)]


def lance_storage_options(uri: str) -> dict[str, str]:
    """LanceDB's object-store options for `uri`, from the same variables: the endpoint (and
    allow_http for an http one), the region, and our timeouts and retries. Credentials stay in
    the environment, where LanceDB's store reads them."""
    kind = scheme_of(uri)
    if kind == "":
        return {}
    http = HttpSettings.from_env()
    opts = {"connect_timeout": f"{int(http.connect_timeout_s * 1000)}ms",
            "timeout": f"{int(http.read_timeout_s * 1000)}ms",
            "client_max_retries": str(http.max_retries),
            "client_retry_timeout": str(int((http.connect_timeout_s + http.read_timeout_s) * (http.max_retries + 1)))}
    if kind == "s3":
        url = endpoint()
        if url:
            opts["aws_endpoint"] = url
            if url.startswith("http://"):
                opts["allow_http"] = "true"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            opts["region"] = region
    return opts
