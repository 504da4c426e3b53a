"""The single-tensor reader: strict headers, exact byte ranges, local and over HTTP Range."""

import json
import re
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from storage.safetensors_reader import (
    INDEX_FILENAME,
    CorruptFileError,
    HttpFile,
    DTYPES,
    LocalFile,
    RangeRequestError,
    UnsupportedTensorError,
    as_matrix,
    check_finite,
    read_header,
    read_repo_tensors,
    read_tensors,
)


def write_raw(path: Path, header: dict, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file written by hand, so it can lie."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def sample(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "b.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "c.bias": rng.standard_normal(16).astype(np.float32),
        "d.idx": np.arange(5, dtype=np.int64),
    }
    np_save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


# --- local reads --------------------------------------------------------------------------------


def test_reads_only_the_requested_tensor(tmp_path):
    path = sample(tmp_path)
    src = LocalFile(path)
    header = read_header(src)
    assert src.bytes_read == 8 + header.header_len
    got = read_tensors(src, ["a.weight"], header)
    ref = np.frombuffer(path.read_bytes()[header.tensors["a.weight"].start : header.tensors["a.weight"].end], "<f4")
    np.testing.assert_array_equal(got["a.weight"], ref.reshape(16, 8))
    assert src.bytes_read == header.bytes_needed(["a.weight"]) < path.stat().st_size
    assert read_tensors(src, ["d.idx"], header)["d.idx"].tolist() == [0, 1, 2, 3, 4]  # ints keep their dtype


def test_float16_and_bfloat16_decode_like_safetensors(tmp_path):
    t = torch.randn(32, 24)
    t[0, :4] = torch.tensor([0.0, -0.0, 65504.0, 1e-7])
    torch_save_file({"h": t.half(), "b": t.bfloat16()}, str(tmp_path / "m.safetensors"))
    ref = torch_load_file(str(tmp_path / "m.safetensors"))
    src = LocalFile(tmp_path / "m.safetensors")
    got = read_tensors(src, ["h", "b"])
    assert got["h"].dtype == got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["h"], ref["h"].float().numpy())
    np.testing.assert_array_equal(got["b"], ref["b"].float().numpy())
    kept = read_tensors(src, ["h"], out_dtype=np.float16)["h"]
    assert kept.dtype == np.float16 and np.array_equal(kept, ref["h"].numpy())


def test_conv_kernels_flatten_to_matrices(tmp_path):
    src = LocalFile(sample(tmp_path))
    kernel = read_tensors(src, ["b.weight"])["b.weight"]
    assert as_matrix(kernel).shape == (4, 27)
    np.testing.assert_array_equal(as_matrix(kernel)[1], kernel[1].ravel())
    assert as_matrix(np.zeros((32, 1, 3, 3))).shape == (32, 9)  # depthwise
    with pytest.raises(ValueError, match="not a weight matrix"):
        as_matrix(np.zeros(16))


def test_nan_weights_are_reported():
    w = np.ones((3, 3), np.float32)
    check_finite("w", w)
    w[1, 1] = np.nan
    w[2, 2] = np.inf
    with pytest.raises(CorruptFileError) as err:
        check_finite("w", w)
    assert err.value.reason == "nonfinite" and "2 NaN/Inf" in str(err.value)


def test_repo_read_checks_values_and_counts_bytes(tmp_path):
    w = np.ones((4, 4), np.float32)
    w[0, 0] = np.nan
    np_save_file({"w": w, "v": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    opener = lambda f: LocalFile(tmp_path / f)  # noqa: E731
    with pytest.raises(CorruptFileError, match="nonfinite") as bad:
        read_repo_tensors(opener, ["w"], ["model.safetensors"])
    header_bytes = 8 + struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]
    assert bad.value.bytes_read == header_bytes + w.nbytes  # a quarantined read still counts its bytes
    r = read_repo_tensors(opener, ["v"], ["model.safetensors"])
    assert r.bytes_read == r.bytes_needed and r.bytes_in_files == (tmp_path / "model.safetensors").stat().st_size


def test_sharded_model_reads_through_the_index(tmp_path):
    np_save_file({"x": np.full((2, 2), 1, np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    np_save_file({"y": np.full((3, 2), 2, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(index))
    files = [p.name for p in tmp_path.iterdir()]
    r = read_repo_tensors(lambda f: LocalFile(tmp_path / f), ["y", "x"], files)
    assert r.tensors["x"].tolist() == [[1, 1], [1, 1]] and r.tensors["y"].shape == (3, 2)
    assert set(r.headers) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert r.bytes_read == r.bytes_needed + (tmp_path / INDEX_FILENAME).stat().st_size


# --- every dtype of the format -------------------------------------------------------------------

# What safetensors' own parser accepts (its Dtype enum, listed in its error for an unknown name).
SAFETENSORS_DTYPES = {"BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                      "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                      "C64", "F64", "I64", "U64"}


def test_the_reader_knows_every_dtype_safetensors_parses():
    blob = json.dumps({"x": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 1]}}).encode()
    with pytest.raises(Exception) as err:
        safetensors.deserialize(struct.pack("<Q", len(blob)) + blob + b"\0")
    listed = set(re.findall(r"`([A-Z0-9_]+)`", str(err.value).partition("expected")[2]))
    assert listed == SAFETENSORS_DTYPES == set(DTYPES)


def test_numpy_dtypes_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "bool": rng.random((3, 5)) > 0.5,
        **{k: rng.integers(np.iinfo(k).min, np.iinfo(k).max, (3, 5), dtype=k, endpoint=True)
           for k in ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64")},
        "float16": rng.standard_normal((3, 5)).astype(np.float16),
        "float64": rng.standard_normal((3, 5)),
        "complex64": (rng.standard_normal((3, 5)) + 1j * rng.standard_normal((3, 5))).astype(np.complex64),
    }
    np_save_file(tensors, str(tmp_path / "m.safetensors"))
    ref = np_load_file(str(tmp_path / "m.safetensors"))
    got = read_tensors(LocalFile(tmp_path / "m.safetensors"), list(tensors), out_dtype=None)
    for k in tensors:
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu",
                                   "float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_torch_float_formats_decode_like_torch(tmp_path, dtype):
    t = torch.randn(64, 48) * 4
    if dtype == "float8_e8m0fnu":
        t = t.abs() + 2.0 ** -60  # a scale format: positive powers of two only
    stored = t.to(getattr(torch, dtype))
    torch_save_file({"w": stored}, str(tmp_path / "m.safetensors"))
    ref = torch_load_file(str(tmp_path / "m.safetensors"))["w"].float().numpy()
    got = read_tensors(LocalFile(tmp_path / "m.safetensors"), ["w"])["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    assert read_tensors(LocalFile(tmp_path / "m.safetensors"), ["w"], out_dtype=None)["w"].dtype == np.float32


def test_fp4_packed_as_torch_and_safetensors_write_it(tmp_path):
    codes = np.random.default_rng(2).integers(0, 16, (6, 10), dtype=np.uint8)
    packed = torch.from_numpy(codes[:, 0::2] | (codes[:, 1::2] << 4))  # first element: low nibble
    torch_save_file({"w": packed.view(torch.float4_e2m1fn_x2)}, str(tmp_path / "m.safetensors"))
    header = read_header(LocalFile(tmp_path / "m.safetensors"))
    assert (header.tensors["w"].dtype, header.tensors["w"].shape, header.tensors["w"].nbytes) == ("F4", (6, 10), 30)
    got = read_tensors(LocalFile(tmp_path / "m.safetensors"), ["w"])["w"]
    np.testing.assert_array_equal(got, codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Little-endian bit stream, written one bit at a time (independent of the reader's arithmetic)."""
    stream = 0
    for i, c in enumerate(codes.ravel().tolist()):
        stream |= int(c) << (i * bits)
    return stream.to_bytes(-(-codes.size * bits // 8), "little")


@pytest.mark.parametrize("name, dtype", [("F6_E2M3", ml_dtypes.float6_e2m3fn), ("F6_E3M2", ml_dtypes.float6_e3m2fn)])
def test_fp6_files_the_safetensors_parser_accepts(tmp_path, name, dtype):
    codes = np.random.default_rng(3).integers(0, 64, (4, 6), dtype=np.uint8)
    data = pack_bits(codes, 6)
    path = write_raw(tmp_path / "m.safetensors", {"w": {"dtype": name, "shape": [4, 6], "data_offsets": [0, len(data)]}}, data)
    assert len(data) == 18 and safetensors.deserialize(path.read_bytes())[0][1]["dtype"] == name
    got = read_tensors(LocalFile(path), ["w"])["w"]
    np.testing.assert_array_equal(got, codes.view(dtype).astype(np.float32))


def test_sub_byte_sizes_round_up_to_whole_bytes(tmp_path):
    codes = np.array([1, 7, 12], np.uint8)  # 3 FP4 values: 12 bits in 2 bytes; 3 FP6: 18 bits in 3
    header = {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]},
              "b": {"dtype": "F6_E3M2", "shape": [3], "data_offsets": [2, 5]}}
    path = write_raw(tmp_path / "m.safetensors", header, pack_bits(codes, 4) + pack_bits(codes, 6))
    got = read_tensors(LocalFile(path), ["a", "b"])
    np.testing.assert_array_equal(got["a"], codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    np.testing.assert_array_equal(got["b"], codes.view(ml_dtypes.float6_e3m2fn).astype(np.float32))
    short = {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}
    assert _reason(write_raw(tmp_path / "short", short, b"\0")) == "size_mismatch"


def test_an_unknown_dtype_matters_only_when_that_tensor_is_requested(tmp_path):
    w = np.arange(6, dtype=np.float32)
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "future": {"dtype": "F3_E1M1", "shape": [8], "data_offsets": [24, 27]}}
    path = write_raw(tmp_path / "model.safetensors", header, w.tobytes() + b"abc")
    src = LocalFile(path)
    np.testing.assert_array_equal(read_tensors(src, ["w"])["w"], w.reshape(2, 3))
    with pytest.raises(UnsupportedTensorError) as err:
        read_repo_tensors(lambda f: LocalFile(tmp_path / f), ["future", "w"], ["model.safetensors"])
    assert err.value.reason == "unsupported_dtype" and err.value.message.startswith("unsupported dtype F3_E1M1")
    assert not isinstance(err.value, CorruptFileError)
    lying = {**header, "future": {**header["future"], "data_offsets": [20, 27]}}
    assert _reason(write_raw(tmp_path / "overlap", lying, w.tobytes() + b"abc")) == "overlapping"


def test_fp8_nan_is_reported(tmp_path):
    torch_save_file({"w": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptFileError, match="nonfinite"):
        read_repo_tensors(lambda f: LocalFile(tmp_path / f), ["w"], ["model.safetensors"])


# --- corrupt files --------------------------------------------------------------------------------


def _reason(path) -> str:
    with pytest.raises(CorruptFileError) as err:
        src = LocalFile(path)
        read_tensors(src, list(read_header(src).tensors))
    return err.value.reason


def test_truncated_files(tmp_path):
    path = sample(tmp_path)
    blob = path.read_bytes()
    (tmp_path / "tiny").write_bytes(blob[:5])
    assert _reason(tmp_path / "tiny") == "truncated"
    (tmp_path / "mid_header").write_bytes(blob[:40])
    assert _reason(tmp_path / "mid_header") == "truncated"
    (tmp_path / "mid_data").write_bytes(blob[:-10])
    assert _reason(tmp_path / "mid_data") == "offset_past_end"


def test_lying_headers(tmp_path):
    t = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    data = bytes(32)
    assert _reason(write_raw(tmp_path / "huge", {"w": t}, data, header_len=2**60)) == "header_too_large"
    past = {"w": {**t, "data_offsets": [16, 32]}, "v": {**t, "data_offsets": [32, 48]}}
    assert _reason(write_raw(tmp_path / "past", past, data)) == "offset_past_end"
    overlap = {"w": t, "v": {**t, "data_offsets": [8, 24]}}
    assert _reason(write_raw(tmp_path / "overlap", overlap, data)) == "overlapping"
    assert _reason(write_raw(tmp_path / "size", {"w": {**t, "shape": [3, 2]}}, data)) == "size_mismatch"
    assert _reason(write_raw(tmp_path / "dtype", {"w": {**t, "dtype": 7}}, data)) == "bad_header"
    assert _reason(write_raw(tmp_path / "neg", {"w": {**t, "data_offsets": [-16, 0]}}, data)) == "bad_header"
    (tmp_path / "json").write_bytes(struct.pack("<Q", 5) + b"{nope" + data)
    assert _reason(tmp_path / "json") == "bad_json"
    (tmp_path / "dup").write_bytes(struct.pack("<Q", 13) + b'{"a":1,"a":2}' + data)
    assert _reason(tmp_path / "dup") == "bad_json"


# --- a multi-GB file, one small tensor ------------------------------------------------------------

BIG = 1 << 30  # elements of a 4 GiB F32 tensor that exists only as a hole on disk


def make_sparse(path: Path) -> np.ndarray:
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = {
        "big": {"dtype": "F32", "shape": [BIG], "data_offsets": [0, 4 * BIG]},
        "small": {"dtype": "F32", "shape": [3, 4], "data_offsets": [4 * BIG, 4 * BIG + 48]},
    }
    blob = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.seek(8 + len(blob) + 4 * BIG)  # never written: a hole, not 4 GiB of disk
        fh.write(small.tobytes())
    return small


def test_one_small_tensor_from_a_sparse_4gib_file(tmp_path):
    path = tmp_path / "big.safetensors"
    small = make_sparse(path)
    assert path.stat().st_size > 4 * BIG
    src = LocalFile(path)
    header = read_header(src)
    got = read_tensors(src, ["small"], header)["small"]
    np.testing.assert_array_equal(got, small)
    assert src.bytes_read == header.bytes_needed(["small"]) == 8 + header.header_len + 48

    # Peak memory in a fresh process: the file's 4 GiB must never be paged in.
    code = (
        "import resource, sys; from storage.safetensors_reader import LocalFile, read_tensors;"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"read_tensors(LocalFile({str(path)!r}), ['small']);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert int(out.stdout) < 50_000  # KiB: growth stays far below the file's size


# --- HTTP Range -------------------------------------------------------------------------------------


class RangeServer(ThreadingHTTPServer):
    """Serves a folder with HTTP Range support and counts the body bytes it sends."""

    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root = root
        self.bytes_served = 0
        self.fail_next = 0  # answer this many requests with 503 + Retry-After: 0
        self.ignore_range = False
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class RangeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, head_only: bool):
        srv: RangeServer = self.server
        with srv.lock:
            if srv.fail_next:
                srv.fail_next -= 1
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if m and not srv.ignore_range:
            start, end = int(m[1]), min(int(m[2] or size - 1), size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head_only:
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        # Counted before the write: the client may finish reading (and the test compare) before
        # this thread runs again; a refused 200 takes its count back.
        with srv.lock:
            srv.bytes_served += len(body)
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            with srv.lock:
                srv.bytes_served -= len(body)

    def do_GET(self):
        self._send(head_only=False)

    def do_HEAD(self):
        self._send(head_only=True)


@pytest.fixture
def server(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # get_session() refuses every request in offline mode; this server is on loopback.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    srv = RangeServer(tmp_path)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_http_reads_match_the_servers_byte_count(tmp_path, server):
    path = sample(tmp_path)
    src = HttpFile(f"{server.url}/model.safetensors", token=False)
    header = read_header(src)
    got = read_tensors(src, ["a.weight", "c.bias"], header)
    local = read_tensors(LocalFile(path), ["a.weight", "c.bias"])
    for name in got:
        np.testing.assert_array_equal(got[name], local[name])
    assert src.bytes_read == server.bytes_served
    assert src.bytes_read <= header.bytes_needed(["a.weight", "c.bias"]) + 4096
    assert src.size() == path.stat().st_size and src.requests == 3  # size came from Content-Range


def test_http_retries_503_then_succeeds(tmp_path, server):
    sample(tmp_path)
    server.fail_next = 2
    from storage.http import HttpClient, RetryPolicy

    waits: list[float] = []
    http = HttpClient(retry=RetryPolicy(base_wait_s=0.01), sleep=waits.append)
    src = HttpFile(f"{server.url}/model.safetensors", token=False, http=http)
    assert "a.weight" in read_header(src).tensors
    assert src.requests == 4 and src.bytes_read == server.bytes_served
    assert waits == [0.01, 0.01]  # Retry-After: 0, floored at the base wait


def test_http_refuses_a_server_that_ignores_range(tmp_path, server):
    sample(tmp_path)
    server.ignore_range = True
    src = HttpFile(f"{server.url}/model.safetensors", token=False)
    with pytest.raises(RangeRequestError, match="range_ignored"):
        src.read(100, 10)
    assert src.bytes_read < 64 * 1024


def test_http_sparse_file_reads_only_what_it_needs(tmp_path, server):
    small = make_sparse(tmp_path / "big.safetensors")
    src = HttpFile(f"{server.url}/big.safetensors", token=False)
    np.testing.assert_array_equal(read_tensors(src, ["small"])["small"], small)
    assert src.bytes_read == server.bytes_served < 1024


def test_http_missing_file_raises_hub_error(server):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError):
        HttpFile(f"{server.url}/nope.safetensors", token=False).read(0, 8)


def test_sources_pickle_for_dask(tmp_path):
    import pickle

    src = LocalFile(sample(tmp_path))
    read_header(src)
    clone = pickle.loads(pickle.dumps(src))
    assert "a.weight" in read_header(clone).tensors
    http = pickle.loads(pickle.dumps(HttpFile("http://127.0.0.1:1/x", session=object())))
    assert http._session is None and http.http.read_timeout_s > 0  # timeouts travel to the worker
