"""Read single tensors out of safetensors files, fetching only their bytes.

A safetensors file is `u64 little-endian header length N` + `N bytes of JSON` + a byte buffer.
The JSON maps each tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative
to the buffer). So one tensor costs 8 + N + its own bytes, whatever the file size: a local file by
seek/read, a remote one by HTTP Range requests. Nothing here mmaps or downloads a whole file.

Files come from strangers, so the header is validated strictly and every problem raises
`CorruptFileError` with a short machine-readable `reason` the caller stores (quarantine).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from probex_core.errors import ProbexError

INDEX_FILENAME = "model.safetensors.index.json"
DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Two wanted tensors closer than this are fetched in one read: one request instead of two, for
# at most this many unwanted bytes.
COALESCE_GAP = 4096


# --- errors ---------------------------------------------------------------------------------


class TensorReadError(ProbexError):
    """Base of the reader's errors. `reason` is a short code for the catalog (e.g. `truncated`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.bytes_read = 0  # read before the problem showed (set by read_repo_tensors)


class CorruptFileError(TensorReadError):
    """The file is not a valid safetensors file (or its values are unusable): quarantine it.

    Reasons: truncated, header_too_large, bad_header, bad_json, offset_past_end, overlapping,
    size_mismatch, nonfinite. (A dtype this reader does not know is not corruption: the file may
    be newer than the reader; only a request for that tensor fails, as `unsupported_dtype`.)
    """


class UnsupportedTensorError(TensorReadError):
    """A valid tensor this reader cannot decode (`unsupported_dtype`), or a missing one."""


class RangeRequestError(TensorReadError):
    """A remote server did not honour a byte-range request; reading on would mean downloading
    the whole file, which this reader never does."""


# --- byte sources -----------------------------------------------------------------------------


class ByteSource:
    """Random access to the bytes of one file. `bytes_read` counts every byte actually fetched."""

    name: str = "?"
    bytes_read: int = 0

    def size(self) -> int:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalFile(ByteSource):
    """A local file read with seek/read; opened lazily so the object pickles (Dask) until used."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = self.path
        self.bytes_read = 0
        self._fh = None

    def __getstate__(self):
        return {"path": self.path, "name": self.name, "bytes_read": self.bytes_read, "_fh": None}

    def size(self) -> int:
        return os.path.getsize(self.path)

    def read(self, offset: int, length: int) -> bytes:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(offset)
        data = self._fh.read(length)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class HttpFile(ByteSource):
    """A remote file read with HTTP Range requests through the one HTTP layer (`storage.http`).

    Every HEAD and ranged GET has the layer's connect/read timeouts and retries (`http`, default
    `HttpClient.from_settings()`: the PROBEX_HTTP_* settings). `session` defaults to
    huggingface_hub's shared client; headers come from `build_hf_headers(token=...)`, where a
    `None` token falls back to `HF_TOKEN` / the cached login. Build `url` with
    `huggingface_hub.hf_hub_url(repo_id, filename, revision=sha)`, or get the whole file from a
    source's opener: `source.opener(repo_id, sha).open(filename)`.
    """

    def __init__(self, url: str, token: str | bool | None = None, session=None, *, http=None):
        from storage.http import HttpClient  # lazy: a worker reading local files never loads httpx

        self.url = url
        self.name = url
        self.token = token
        self._session = session
        self.http = http if http is not None else HttpClient.from_settings()
        self.bytes_read = 0
        self.requests = 0
        self._size: int | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None  # an httpx client does not pickle; workers use their own
        return state

    def _count(self) -> None:
        self.requests += 1

    def _request(self, method: str, headers: dict[str, str], handle: Callable):
        return self.http.request(method, self.url, token=self.token, headers=headers, handle=handle,
                                 session=self._session, on_send=self._count)

    def size(self) -> int:
        if self._size is None:
            def handle(resp):
                length = resp.headers.get("content-length")
                if length is None:
                    raise RangeRequestError("no_size", f"{self.url}: HEAD gave no Content-Length")
                return int(length)

            self._size = self._request("HEAD", {"Accept-Encoding": "identity"}, handle)
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        end = offset + length - 1

        def handle(resp):
            if resp.status_code == 206:
                # "bytes first-last/total": check the server sent the range we asked for
                span, _, total = resp.headers.get("content-range", "").removeprefix("bytes ").partition("/")
                if span.partition("-")[0] != str(offset):
                    raise RangeRequestError("bad_range", f"{self.url} sent range {span!r}, not {offset}-{end}")
                if total.isdigit():
                    self._size = int(total)  # saves a HEAD request later
            elif not (resp.status_code == 200 and offset == 0):
                # A 200 answer carries the whole file from byte 0; refuse rather than download it.
                raise RangeRequestError(
                    "range_ignored",
                    f"{self.url} answered {resp.status_code} to a Range request; "
                    "use a server that supports HTTP Range (the Hub and its CDN do)",
                )
            chunks, got = [], 0
            for chunk in resp.iter_raw():
                chunks.append(chunk)
                got += len(chunk)
                self.bytes_read += len(chunk)
                if got >= length:
                    break  # a 200 answer may go on past what we asked for: stop reading it
            return b"".join(chunks)[:length]

        # identity: byte offsets refer to the stored file, not to a compressed stream
        return self._request("GET", {"Range": f"bytes={offset}-{end}", "Accept-Encoding": "identity"}, handle)


# --- header -----------------------------------------------------------------------------------

# Every dtype of the safetensors format (the Rust crate's `Dtype`): name -> (bits per element,
# the numpy dtype one stored code is viewed as). ml_dtypes supplies the float formats numpy lacks;
# sub-byte codes (F4, F6) are unpacked to one byte each before the view.
DTYPES: dict[str, tuple[int, np.dtype]] = {
    "BOOL": (8, np.dtype("?")),
    "U8": (8, np.dtype("u1")),
    "I8": (8, np.dtype("i1")),
    "U16": (16, np.dtype("<u2")),
    "I16": (16, np.dtype("<i2")),
    "U32": (32, np.dtype("<u4")),
    "I32": (32, np.dtype("<i4")),
    "U64": (64, np.dtype("<u8")),
    "I64": (64, np.dtype("<i8")),
    "F16": (16, np.dtype("<f2")),
    "BF16": (16, np.dtype(ml_dtypes.bfloat16)),
    "F32": (32, np.dtype("<f4")),
    "F64": (64, np.dtype("<f8")),
    "C64": (64, np.dtype("<c8")),
    "F8_E4M3": (8, np.dtype(ml_dtypes.float8_e4m3fn)),
    "F8_E5M2": (8, np.dtype(ml_dtypes.float8_e5m2)),
    "F8_E8M0": (8, np.dtype(ml_dtypes.float8_e8m0fnu)),
    "F8_E4M3FNUZ": (8, np.dtype(ml_dtypes.float8_e4m3fnuz)),
    "F8_E5M2FNUZ": (8, np.dtype(ml_dtypes.float8_e5m2fnuz)),
    "F6_E2M3": (6, np.dtype(ml_dtypes.float6_e2m3fn)),
    "F6_E3M2": (6, np.dtype(ml_dtypes.float6_e3m2fn)),
    "F4": (4, np.dtype(ml_dtypes.float4_e2m1fn)),
}
FLOAT_DTYPES = {n for n in DTYPES if n.startswith(("F", "BF"))}


def nbytes_of(dtype: str, shape: Iterable[int]) -> int:
    """Bytes a tensor occupies: sub-byte dtypes are packed, so ceil(numel * bits / 8)."""
    return -(-math.prod(shape) * DTYPES[dtype][0] // 8)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    header_len: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int | None = None

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def bytes_needed(self, names: Iterable[str]) -> int:
        """The physical minimum to read `names`: length prefix + header + their own bytes."""
        return self.data_start + sum(self.tensors[n].nbytes for n in set(names))


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise CorruptFileError("bad_json", "header JSON repeats a key")
    return dict(pairs)


def _parse_entry(name: str, entry, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CorruptFileError("bad_header", f"tensor {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise CorruptFileError("bad_header", f"tensor {name!r} has a non-string dtype {dtype!r}")
    ok_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(shape, list) or not all(ok_int(d) for d in shape):
        raise CorruptFileError("bad_header", f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(ok_int(o) for o in offsets)):
        raise CorruptFileError("bad_header", f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise CorruptFileError("bad_header", f"tensor {name!r} ends before it begins ({offsets})")
    # An unknown dtype's size cannot be checked; its range is still checked against the others.
    if dtype in DTYPES and end - begin != (expected := nbytes_of(dtype, shape)):
        raise CorruptFileError(
            "size_mismatch",
            f"tensor {name!r} spans {end - begin} bytes but {dtype}{shape} needs {expected}",
        )
    return TensorInfo(dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(src: ByteSource, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Fetch and validate the header: 8 + N bytes, two reads, whatever the file size."""
    prefix = src.read(0, 8)
    if len(prefix) < 8:
        raise CorruptFileError("truncated", f"{src.name} has {len(prefix)} bytes, fewer than the 8-byte length prefix")
    (header_len,) = struct.unpack("<Q", prefix)
    file_size = src.size()
    if header_len > max_header_bytes:
        raise CorruptFileError(
            "header_too_large",
            f"{src.name} declares a {header_len}-byte header, over the {max_header_bytes}-byte limit "
            "(corrupt or not a safetensors file; raise max_header_bytes only if it is genuine)",
        )
    if 8 + header_len > file_size:
        raise CorruptFileError(
            "truncated", f"{src.name} declares a {header_len}-byte header but has only {file_size} bytes; re-download it"
        )
    raw = src.read(8, header_len)
    if len(raw) < header_len:
        raise CorruptFileError("truncated", f"{src.name} ended inside its header")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError("bad_json", f"{src.name}: header is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError("bad_json", f"{src.name}: header is not a JSON object")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptFileError("bad_header", f"{src.name}: __metadata__ is not an object")
    data_start = 8 + header_len
    tensors = {name: _parse_entry(name, entry, data_start) for name, entry in doc.items()}

    # Every range must lie inside the file and no two may share bytes. Holes and trailing bytes
    # are tolerated (the safetensors library is stricter) because they cannot mislead a reader.
    prev_name, prev_end = None, data_start
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.end > file_size:
            raise CorruptFileError(
                "offset_past_end",
                f"{src.name}: tensor {name!r} ends at byte {info.end} but the file has {file_size} "
                "(truncated download or a lying header; re-download it)",
            )
        if info.start < prev_end and info.nbytes:
            raise CorruptFileError("overlapping", f"{src.name}: tensors {prev_name!r} and {name!r} share bytes")
        if info.nbytes:
            prev_name, prev_end = name, info.end
    return SafetensorsHeader(header_len, tensors, {str(k): str(v) for k, v in metadata.items()}, file_size)


# --- tensors ----------------------------------------------------------------------------------


def _unpack_codes(buf: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Sub-byte codes, one per byte (in its low bits). Packing is little-endian within the byte
    stream, as torch's float4_e2m1fn_x2 (first element in the low nibble), which safetensors
    writes for F4; F6 follows the same rule: element i holds bits [6i, 6i + 6) of the stream."""
    raw = np.frombuffer(buf, np.uint8)
    if bits == 4:
        codes = np.empty(raw.size * 2, np.uint8)
        codes[0::2], codes[1::2] = raw & 0x0F, raw >> 4
        return codes[:count]
    if bits == 6:  # 4 codes in 3 bytes
        pad = np.zeros(-(-raw.size // 3) * 3, np.uint8)
        pad[: raw.size] = raw
        b0, b1, b2 = (pad[i::3] for i in range(3))
        codes = np.empty((b0.size, 4), np.uint8)
        codes[:, 0] = b0 & 0x3F
        codes[:, 1] = (b0 >> 6) | ((b1 & 0x0F) << 2)
        codes[:, 2] = (b1 >> 4) | ((b2 & 0x03) << 4)
        codes[:, 3] = b2 >> 2
        return codes.ravel()[:count]
    raise ValueError(f"no unpacking rule for {bits}-bit codes")


def _decode(info: TensorInfo, buf: bytes | memoryview, out_dtype, name: str) -> np.ndarray:
    bits, dtype = DTYPES[info.dtype]
    if bits < 8:
        arr = _unpack_codes(buf, bits, math.prod(info.shape)).view(dtype)
    else:
        arr = np.frombuffer(buf, dtype=dtype)
    arr = arr.reshape(info.shape)
    if info.dtype in FLOAT_DTYPES:
        if out_dtype is None:  # keep the stored float type where numpy has it
            out_dtype = arr.dtype if arr.dtype.char in "efd" else np.float32
        return arr.astype(np.dtype(out_dtype).newbyteorder("="))  # copies: writable, owns its memory
    # integers, bool and complex keep their stored dtype, as native-endian
    return arr.astype(arr.dtype.newbyteorder("="))


def unsupported_dtypes(header: SafetensorsHeader, names: Iterable[str]) -> None:
    """Raise UnsupportedTensorError('unsupported_dtype') if any of `names` has a dtype this reader
    does not know; other tensors of the same file stay readable."""
    for name in names:
        dtype = header.tensors[name].dtype
        if dtype not in DTYPES:
            raise UnsupportedTensorError("unsupported_dtype", f"unsupported dtype {dtype} (tensor {name!r})")


def _coalesce(infos: list[TensorInfo], gap: int) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for info in sorted(infos, key=lambda i: i.start):
        if spans and info.start - spans[-1][1] <= gap:
            spans[-1][1] = max(spans[-1][1], info.end)
        else:
            spans.append([info.start, info.end])
    return [(a, b) for a, b in spans]


def read_tensors(
    src: ByteSource,
    names: Iterable[str],
    header: SafetensorsHeader | None = None,
    out_dtype=np.float32,
    *,
    coalesce_gap: int = COALESCE_GAP,
) -> dict[str, np.ndarray]:
    """Read only the byte ranges of `names`.

    Floating tensors become `out_dtype` (float32 by default; `np.float16` keeps F16 as stored;
    `None` keeps F16/F32/F64 as stored and widens the formats numpy lacks (BF16, FP8, FP6, FP4)
    to float32). Integer, bool and complex tensors always keep their stored dtype.
    """
    header = header or read_header(src)
    names = list(dict.fromkeys(names))
    missing = [n for n in names if n not in header.tensors]
    if missing:
        raise UnsupportedTensorError("missing_tensor", f"{src.name} has no tensor {missing[0]!r}")
    unsupported_dtypes(header, names)  # before any byte of them is fetched
    infos = {n: header.tensors[n] for n in names}
    out: dict[str, np.ndarray] = {}
    for start, end in _coalesce(list(infos.values()), coalesce_gap):
        buf = src.read(start, end - start)
        if len(buf) < end - start:
            raise CorruptFileError("truncated", f"{src.name} ended at byte {start + len(buf)}, before {end}")
        view = memoryview(buf)
        for name, info in infos.items():
            if start <= info.start and info.end <= end:
                out[name] = _decode(info, view[info.start - start : info.end - start], out_dtype, name)
    return out


def check_finite(name: str, arr: np.ndarray) -> None:
    """Raise CorruptFileError('nonfinite') if `arr` holds NaN or Inf (a diverged or broken model)."""
    if arr.dtype.kind in "fc":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise CorruptFileError("nonfinite", f"tensor {name!r} has {bad} NaN/Inf values of {arr.size}")


def as_matrix(arr: np.ndarray) -> np.ndarray:
    """A weight as a 2-D matrix, rows = output units.

    Conv kernels `out x in x kh x kw` become `out x (in*kh*kw)` (depthwise `out x 1 x k x k`
    becomes `out x k*k`); Conv1d `out x in x k` becomes `out x (in*k)`. The flattening is the
    same one PEFT uses for conv LoRA (`B @ A.reshape(r, -1)`), so LoRA factors flattened this
    way multiply to the flattened delta.
    """
    if arr.ndim < 2:
        raise ValueError(f"a {arr.ndim}-D tensor of shape {arr.shape} is not a weight matrix (bias or norm?)")
    return arr.reshape(arr.shape[0], -1)


# --- sharded repos ----------------------------------------------------------------------------

Opener = Callable[[str], ByteSource]  # repo filename -> ByteSource (LocalFile or HttpFile)


def read_weight_map(src: ByteSource, max_bytes: int = 64 * 1024 * 1024) -> dict[str, str]:
    """`model.safetensors.index.json` -> {tensor name: shard filename}."""
    size = src.size()
    if size > max_bytes:
        raise CorruptFileError("header_too_large", f"{src.name} is {size} bytes, over the {max_bytes}-byte index limit")
    try:
        weight_map = json.loads(src.read(0, size).decode("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError("bad_json", f"{src.name} is not a safetensors index ({err!r})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError("bad_json", f"{src.name}: weight_map is not a name -> filename object")
    return weight_map


def shards_for(names: Iterable[str], weight_map: dict[str, str]) -> dict[str, list[str]]:
    """Group tensor names by the shard that holds them: {filename: [names]}."""
    plan: dict[str, list[str]] = {}
    for name in dict.fromkeys(names):
        if name not in weight_map:
            raise UnsupportedTensorError("missing_tensor", f"the shard index lists no tensor {name!r}")
        plan.setdefault(weight_map[name], []).append(name)
    return plan


@dataclass
class RepoLayout:
    """Where a repo's tensors live: {tensor name: file}, with the headers already read (a
    single-file repo's header is read to list its names; a sharded repo's come from its index)."""

    weight_map: dict[str, str]
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # filename -> header
    bytes_read: int = 0  # index and headers fetched so far

    @property
    def names(self) -> set[str]:
        return set(self.weight_map)

    def header(self, opener: Opener, filename: str) -> SafetensorsHeader:
        """The header of one file of the repo, read once."""
        if filename not in self.headers:
            src = opener(filename)
            try:
                self.headers[filename] = read_header(src)
            finally:
                self.bytes_read += src.bytes_read
                src.close()
        return self.headers[filename]

    def dtype(self, name: str) -> str | None:
        header = self.headers.get(self.weight_map.get(name, ""))
        info = header.tensors.get(name) if header else None
        return info.dtype if info else None


def default_weights_file(repo_files: Iterable[str]) -> str:
    repo_files = set(repo_files)
    if INDEX_FILENAME in repo_files:
        return INDEX_FILENAME
    return "model.safetensors" if "model.safetensors" in repo_files else "adapter_model.safetensors"


def repo_layout(opener: Opener, repo_files: Iterable[str], filename: str | None = None) -> RepoLayout:
    """The layout of a repo's weights in `filename`: a safetensors file, or a shard index
    (`*.index.json`, whose shard names are relative to its folder). Default: the shard index when
    the repo has one, else `model.safetensors`, else `adapter_model.safetensors`."""
    filename = filename or default_weights_file(repo_files)
    layout = RepoLayout({})
    try:
        if filename.endswith(".index.json"):
            index = opener(filename)
            try:
                folder = filename.rpartition("/")[0]
                layout.weight_map = {n: f"{folder}/{f}" if folder else f for n, f in read_weight_map(index).items()}
            finally:
                layout.bytes_read += index.bytes_read
                index.close()
        else:
            layout.weight_map = dict.fromkeys(layout.header(opener, filename).tensors, filename)
    except TensorReadError as e:
        e.bytes_read = layout.bytes_read
        raise
    return layout


@dataclass
class RepoRead:
    tensors: dict[str, np.ndarray]
    bytes_read: int  # fetched, index and headers included
    bytes_needed: int  # the minimum: length prefixes + headers + the tensors' own bytes
    bytes_in_files: int  # total size of the safetensors files touched
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)  # filename -> header

    def dtype(self, name: str) -> str | None:
        """The stored dtype of a tensor that was read."""
        return next((h.tensors[name].dtype for h in self.headers.values() if name in h.tensors), None)


def read_repo_tensors(
    opener: Opener,
    names: Iterable[str],
    repo_files: Iterable[str],
    *,
    filename: str | None = None,
    layout: RepoLayout | None = None,
    out_dtype=np.float32,
    check: bool = True,
) -> RepoRead:
    """Read `names` from a repo: through its shard index or its single weights file (see
    `repo_layout`; pass a `layout` already made to reuse its headers). With `check`, NaN/Inf
    values raise CorruptFileError('nonfinite')."""
    names = list(dict.fromkeys(names))
    bytes_read = 0
    try:
        if layout is None:
            layout = repo_layout(opener, repo_files, filename)
        else:
            bytes_read -= layout.bytes_read  # count only what this call fetches
        plan = shards_for(names, layout.weight_map)
        result = RepoRead({}, 0, 0, 0)
        for shard, shard_names in plan.items():
            header = layout.header(opener, shard)
            src = opener(shard)
            try:
                tensors = read_tensors(src, shard_names, header, out_dtype)
            finally:
                bytes_read += src.bytes_read
                src.close()
            if check:
                for name, arr in tensors.items():
                    check_finite(name, arr)
            result.tensors.update(tensors)
            result.headers[shard] = header
            result.bytes_needed += header.bytes_needed(shard_names)
            result.bytes_in_files += header.file_size or 0
    except TensorReadError as e:
        # a quarantined model's reads still count (they were transferred)
        e.bytes_read = bytes_read + (layout.bytes_read if layout else e.bytes_read)
        raise
    result.bytes_read = bytes_read + layout.bytes_read
    return result
