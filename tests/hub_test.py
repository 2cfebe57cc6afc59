"""Tests of pretrained weights by name (densenet_jax.pretrained.hub) against a real HTTP server
on 127.0.0.1 serving generated files: download, verification, conversion, the cache, the
mirror, failure messages, resumption and one download for concurrent processes."""

import dataclasses
import hashlib
import http.server
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from flax import traverse_util

from densenet_jax import models, predict, pretrained
from densenet_jax.pretrained import hub

safetensors_numpy = pytest.importorskip("safetensors.numpy")

REPO = pathlib.Path(__file__).resolve().parents[1]
NAME = "tiny"  # the registry entry each test adds (monkeypatch: the library's stays as it is)
FILE = "tiny-weights.safetensors"


class Server(http.server.ThreadingHTTPServer):
  """Serves `files` by path; counts GETs; optional delay, Range support and one cut-off."""
  daemon_threads = True

  def __init__(self):
    super().__init__(("127.0.0.1", 0), Handler)
    self.files: dict[str, bytes] = {}
    self.gets: list[tuple[str, str | None]] = []  # (path, Range header)
    self.delay_s = 0.0
    self.honour_range = True
    self.cut_next_at: int | None = None  # send only this many bytes of the next answer
    self.trickle_s = 0.0  # send the body one byte at a time, this far apart
    self.head_trickle_s = 0.0  # send the status line and headers one byte at a time
    self.send_length = True  # False: no Content-Length, the body ends when the server closes
    self.endless = False  # after the body, send zeros until the client hangs up
    self.sent = 0  # body bytes written, over all answers

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_port}"


class Handler(http.server.BaseHTTPRequestHandler):
  server: Server

  def do_GET(self):  # noqa: N802 (http.server's naming)
    s = self.server
    s.gets.append((self.path, self.headers.get("Range")))
    time.sleep(s.delay_s)
    body = s.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    if s.head_trickle_s:
      self.trickle_head(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode(), body)
      return
    start = 0
    m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
    if m and s.honour_range:
      start = int(m[1])
      if start >= len(body):
        self.send_error(416)
        return
      self.send_response(206)
      self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    else:
      self.send_response(200)
    if s.send_length:
      self.send_header("Content-Length", str(len(body) - start))
    self.end_headers()
    cut, s.cut_next_at = s.cut_next_at, None
    payload = body[start:] if cut is None else body[start:cut]
    step = 1 if s.trickle_s else max(len(payload), 1)
    try:
      for i in range(0, len(payload), step):
        self.wfile.write(payload[i:i + step])
        s.sent += len(payload[i:i + step])
        time.sleep(s.trickle_s)
      while s.endless:
        self.wfile.write(bytes(1 << 16))
        s.sent += 1 << 16
    except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
      pass
    self.close_connection = True

  def do_CONNECT(self):  # noqa: N802 (a proxy's tunnel for HTTPS)
    self.server.gets.append(("CONNECT " + self.path, None))
    self.trickle_head(b"HTTP/1.0 200 Connection established\r\n\r\n", b"")

  def trickle_head(self, head: bytes, body: bytes) -> None:
    try:
      for i in range(len(head)):
        self.wfile.write(head[i:i + 1])
        time.sleep(self.server.head_trickle_s)
      self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      pass
    self.close_connection = True

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  s = Server()
  thread = threading.Thread(target=s.serve_forever, daemon=True)
  thread.start()
  yield s
  s.shutdown()
  s.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  root = tmp_path / "cache"
  monkeypatch.setenv(hub.CACHE_ENV, str(root))
  for variable in (hub.MIRROR_ENV, hub.DOWNLOAD_TIMEOUT_ENV, hub.MIN_RATE_ENV,
                   hub.LOCK_TIMEOUT_ENV):
    monkeypatch.delenv(variable, raising=False)
  monkeypatch.setattr(hub, "_warned_prefix", set())  # each test sees its own warnings
  return root


@pytest.fixture(scope="module")
def weights() -> tuple[dict, bytes]:
  """Random densenet40 variables and the same as a torchvision-style .safetensors file."""
  model = models.get_model("densenet40")
  shapes = pretrained.flat_variable_shapes(model)
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in shapes.items()}
  state_dict = {}
  for path, value in flat.items():
    collection, *modules, leaf = path.split("/")
    modules = ["norm5" if m == "norm_final" else m for m in modules]
    prefix = [] if modules[0] == "classifier" else ["features"]
    name = {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    if leaf == "kernel":  # HWIO -> OIHW; (in, out) -> (out, in)
      name, value = "weight", value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state_dict[".".join(prefix + modules + [name])] = np.ascontiguousarray(value)
  return flat, safetensors_numpy.save(state_dict)


def register(monkeypatch, url: str, data: bytes, digest_len: int = 64,
             size: int | None = None) -> hub.Source:
  """Adds NAME to the registry, pinned to data's sha256 (or its prefix, torchvision-style)."""
  digest = hashlib.sha256(data).hexdigest()[:digest_len]
  source = hub.Source("densenet40", "torchvision", url, "sha256", digest, "test",
                      file_name=FILE, size=size)
  monkeypatch.setitem(hub.REGISTRY, NAME, source)
  return source


def files_in(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same(variables, flat):
  loaded = traverse_util.flatten_dict(variables, sep="/")
  assert loaded.keys() == flat.keys()
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(loaded[k]), v)


def test_good_file_is_downloaded_verified_converted_cached_then_loaded_offline(
    server, cache, weights, monkeypatch, capsys, tmp_path):
  flat, data = weights
  monkeypatch.chdir(tmp_path)
  (tmp_path / NAME).mkdir()  # a directory of the same name is not a checkpoint file
  server.files["/models/published.safetensors"] = data
  register(monkeypatch, server.url + "/models/published.safetensors", data)
  model, variables = pretrained.load(NAME)
  assert model.bn_epsilon == 1e-5 and model.num_classes == 10
  assert_same(variables, flat)
  assert "downloading tiny-weights.safetensors" in capsys.readouterr().err
  assert files_in(cache) == ["checkpoints/tiny-weights.npz", f"downloads/{FILE}",
                             f"locks/{FILE}.lock"]
  assert server.gets == [("/models/published.safetensors", None)]

  server.files.clear()  # offline from here on: everything comes from the cache
  _, variables, metadata = pretrained.load_with_metadata(NAME, features_only=True)
  assert_same(variables, flat)
  assert metadata["source_file"] == FILE
  assert pretrained.read_checkpoint(NAME)[0]["bn_epsilon"] == 1e-5  # as the trainer reads it
  (cache / "checkpoints/tiny-weights.npz").unlink()  # reconverted from the kept download
  assert_same(pretrained.load(NAME)[1], flat)
  assert len(server.gets) == 1


def test_tampered_file_is_refused_and_nothing_is_cached(server, cache, weights, monkeypatch):
  _, data = weights
  tampered = bytearray(data)
  tampered[-5] ^= 1  # one flipped bit in a tensor
  server.files["/w.safetensors"] = bytes(tampered)
  source = register(monkeypatch, server.url + "/w.safetensors", data)
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load(NAME)
  assert f"not the pinned sha256 {source.digest}: refused and deleted, nothing cached" in str(
      e.value)
  assert hashlib.sha256(tampered).hexdigest() in str(e.value)
  assert files_in(cache) == [f"locks/{FILE}.lock"]  # the empty lock file only
  # A file of the right name placed by hand is checked the same way.
  (cache / "downloads").mkdir(exist_ok=True)
  (cache / "downloads" / FILE).write_bytes(tampered)
  with pytest.raises(pretrained.WeightsError, match="already in the cache.*refused"):
    pretrained.load(NAME)
  assert files_in(cache) == [f"locks/{FILE}.lock"]


def test_dead_mirror_gives_one_clear_message_and_the_manual_route_works(
    server, cache, weights, monkeypatch, capsys, tmp_path):
  from PIL import Image

  flat, data = weights
  image = tmp_path / "x.png"  # predict reads its images before it loads (downloads) weights
  Image.new("RGB", (4, 4)).save(image)
  with socket.socket() as s:  # a port with nothing listening
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/mirror"
  source = register(monkeypatch, "https://download.invalid/models/published.safetensors", data)
  monkeypatch.setenv(hub.MIRROR_ENV, dead + "/")
  assert predict.main(["--weights", NAME, str(image)]) == 1  # a run-time failure
  err = capsys.readouterr().err
  target = cache / "downloads" / FILE
  assert err.startswith(f"predict: error: Cannot download 'tiny' from {dead}/{FILE}: ")
  assert "Connection refused" in err and "Traceback" not in err
  assert f"copy {FILE} from {dead}/{FILE} (or {source.url}) to {target} by hand" in err
  assert f"checked against sha256 {source.digest} before use" in err
  assert not target.exists() and not target.with_name(FILE + ".part").exists()

  server.files[f"/mirror/{FILE}"] = data  # a live mirror: fetched as $MIRROR/<file name>
  monkeypatch.setenv(hub.MIRROR_ENV, server.url + "/mirror")
  assert_same(pretrained.load(NAME)[1], flat)
  assert server.gets == [(f"/mirror/{FILE}", None)]

  for path in (cache / "checkpoints").iterdir():  # by hand: the file at the named place
    path.unlink()
  monkeypatch.setenv(hub.MIRROR_ENV, dead)
  assert target.is_file()
  assert_same(pretrained.load(NAME)[1], flat)


@pytest.mark.parametrize("honour_range", [True, False])
def test_interrupted_download_resumes_or_restarts(server, cache, weights, monkeypatch,
                                                  honour_range):
  flat, data = weights
  server.files["/w.safetensors"] = data
  server.honour_range = honour_range
  register(monkeypatch, server.url + "/w.safetensors", data, digest_len=8)  # a prefix pin
  half = len(data) // 2
  server.cut_next_at = half
  with pytest.raises(pretrained.WeightsError, match=f"closed after {half} of {len(data)} bytes"
                     r".*partial download is kept .* resumes on the next try"):
    pretrained.load(NAME)
  part = cache / "downloads" / (FILE + ".part")
  assert part.stat().st_size == half
  assert_same(pretrained.load(NAME)[1], flat)
  assert [r for _, r in server.gets] == [None, f"bytes={half}-"]
  assert not part.exists()


def test_a_part_that_is_not_a_prefix_is_restarted(server, cache, weights, monkeypatch):
  flat, data = weights
  server.files["/w.safetensors"] = data
  register(monkeypatch, server.url + "/w.safetensors", data)
  part = cache / "downloads" / (FILE + ".part")
  part.parent.mkdir(parents=True)
  part.write_bytes(b"x" * (len(data) + 10))  # longer than the file: the server answers 416
  assert_same(pretrained.load(NAME)[1], flat)
  assert [r for _, r in server.gets] == [f"bytes={len(data) + 10}-", None]


CHILD = r"""
import pathlib, sys, time
from densenet_jax import pretrained
from densenet_jax.pretrained import hub
url, digest, ready, index = sys.argv[1:]
hub.REGISTRY["tiny"] = hub.Source("densenet40", "torchvision", url, "sha256", digest, "test",
                                  file_name="tiny-weights.safetensors")
ready = pathlib.Path(ready)
(ready / index).touch()
deadline = time.monotonic() + 120
while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:  # start together
  time.sleep(0.01)
model, variables = pretrained.load("tiny")
print(model.num_classes)
"""


def test_two_processes_loading_at_once_download_once(server, cache, weights, tmp_path):
  _, data = weights
  server.files["/w.safetensors"] = data
  server.delay_s = 2.0  # the first download is still running when the second process asks
  ready = tmp_path / "ready"
  ready.mkdir()
  digest = hashlib.sha256(data).hexdigest()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", CHILD, server.url + "/w.safetensors",
                             digest, str(ready), str(i)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, results):
    assert p.returncode == 0, err
    assert out.strip() == "10"
  assert len(server.gets) == 1
  waited = ["waiting for another process to fetch tiny-weights.safetensors" in err
            for _, err in results]
  assert sorted(waited) == [False, True]


def test_pth_only_model_without_torch_says_so_before_downloading(cache, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load("densenet169")
  msg = str(e.value)
  assert "densenet169-b2777c0a.pth, a PyTorch pickle that needs torch" in msg
  assert "'keras/densenet169' / 'keras/densenet169_notop' (torch-free)" in msg
  with pytest.raises(pretrained.WeightsError, match=r"densenet161\.tv_in1k\.bin, a PyTorch "
                     "pickle that needs torch to read: pip install torch; no torch-free file"):
    pretrained.load("densenet161")
  capsys.readouterr()
  with pytest.raises(pretrained.WeightsError, match="densenet161-8d451a50.pth, a PyTorch pickle"):
    pretrained.load("torchvision/densenet161")
  # The warning comes first, and names the fully hashed copy of the same weights.
  assert "only a 32-bit sha256 prefix (8d451a50) is published for densenet161-8d451a50.pth, so " \
         "only that much of the file is checked. 'timm/densenet161' has the same weights, " \
         "fully hashed." in capsys.readouterr().err
  assert not cache.exists()


def test_unknown_names_list_the_registry_and_paths_still_work(cache, tmp_path, weights):
  with pytest.raises(FileNotFoundError, match=r"no pretrained weights of that name; the names "
                     r"are: torchvision/densenet121, .*keras/densenet201_notop, densenet121"):
    pretrained.load("densenet12")
  flat, data = weights
  (tmp_path / "w.safetensors").write_bytes(data)
  pretrained.convert("torchvision", tmp_path / "w.safetensors", tmp_path / "w.npz", "densenet40")
  assert_same(pretrained.load(tmp_path / "w.npz")[1], flat)
  assert_same(pretrained.load(str(tmp_path / "w.npz"))[1], flat)


def test_registry_pins_real_hashes_and_a_torch_free_source_per_model_where_published():
  by_file = {}
  for name, source in hub.REGISTRY.items():
    assert re.fullmatch(r"[0-9a-f]{8,}", source.digest), name
    assert len(source.digest) in (8, 2 * hashlib.new(source.algorithm).digest_size), name
    assert source.model in models.list_models() and source.framework in pretrained.SOURCES
    assert by_file.setdefault(source.name, source) == source, f"{source.name} pinned twice"
  torch_free = {s.model for s in hub.REGISTRY.values() if not s.needs_torch}
  assert torch_free == {"densenet121", "densenet169", "densenet201"}  # 161: only pickles
  assert not hub.REGISTRY["densenet121"].needs_torch
  # A bare name takes a fully hashed file where one is published (timm's), else the prefix.
  assert [n for n in ("densenet121", "densenet161", "densenet169", "densenet201")
          if hub.REGISTRY[n].full_digest] == ["densenet121", "densenet161"]
  assert hub.REGISTRY["densenet161"].name == "densenet161.tv_in1k.bin"
  # Bare names are torchvision's weights, as in torchvision and timm.
  assert all(hub.REGISTRY[f"densenet{n}"].framework == "torchvision"
             for n in (121, 161, 169, 201))


def weights_table() -> list[str]:
  """docs/pretrained.md's table, one row per published file, from hub.REGISTRY."""
  names: dict[hub.Source, list[str]] = {}
  for name, source in hub.REGISTRY.items():
    names.setdefault(source, []).append(name)
  rows = ["| name | also named | published file | pinned hash | reader | licence |",
          "|---|---|---|---|---|---|"]
  for source, (name, *aliases) in names.items():
    pinned = (f"{source.algorithm} `{source.digest}`" if source.full_digest else
              f"{source.algorithm} prefix `{source.digest}`")
    reader = ("torch" if source.needs_torch else
              "safetensors" if source.name.endswith(".safetensors") else "h5py")
    rows.append(f"| `{name}` | {', '.join(f'`{a}`' for a in aliases)} | "
                f"[{source.name}]({source.url}) | {pinned} | {reader} | {source.license} |")
  return rows


def test_the_docs_weights_table_is_the_registry():
  doc = (REPO / "docs" / "pretrained.md").read_text()
  table = [line for line in doc.splitlines() if line.startswith("|")]
  assert table[:len(weights_table())] == weights_table(), (
      "docs/pretrained.md's weights table differs from hub.REGISTRY; its rows should be:\n"
      + "\n".join(weights_table()))
  for variable in (hub.CACHE_ENV, hub.MIRROR_ENV):
    assert variable in doc


# ------------------------------------------------------------------ hostile servers and caches

def test_a_trickling_server_is_cut_off_by_the_overall_deadline(server, cache, monkeypatch):
  data = bytes(range(256)) * 2
  server.files["/w.safetensors"] = data
  server.trickle_s = 0.02  # 50 bytes/s: each socket read is quick, the whole is not
  register(monkeypatch, server.url + "/w.safetensors", data, size=len(data))
  monkeypatch.setenv(hub.DOWNLOAD_TIMEOUT_ENV, "1")
  monkeypatch.setenv(hub.MIN_RATE_ENV, "0")  # off: only the deadline can stop it
  started = time.monotonic()
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load(NAME)
  elapsed = time.monotonic() - started
  msg = str(e.value)
  assert elapsed < 5, elapsed
  assert f"the download took longer than {hub.DOWNLOAD_TIMEOUT_ENV}=1 s" in msg
  assert "raise it for a slow link" in msg and "partial download is kept" in msg
  assert 0 < (cache / "downloads" / (FILE + ".part")).stat().st_size < len(data)


@pytest.mark.parametrize("via_proxy", [False, True])
def test_the_deadline_also_bounds_connecting_and_the_response_headers(server, cache, monkeypatch,
                                                                     via_proxy):
  data = bytes(range(256)) * 2
  server.files["/w.safetensors"] = data
  server.head_trickle_s = 0.3  # ~40 bytes in 12 s, each byte well within a socket timeout
  url = server.url + "/w.safetensors"
  if via_proxy:  # the proxy trickles its answer to CONNECT, before any TLS or HTTP
    url = "https://weights.invalid/w.safetensors"
    monkeypatch.setenv("https_proxy", server.url)
    monkeypatch.delenv("no_proxy", raising=False)
  register(monkeypatch, url, data, size=len(data))
  monkeypatch.setenv(hub.DOWNLOAD_TIMEOUT_ENV, "1")
  monkeypatch.setenv(hub.MIN_RATE_ENV, "0")  # off: only the deadline can stop it
  started = time.monotonic()
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load(NAME)
  elapsed = time.monotonic() - started  # 12 s when only the body was bounded
  assert elapsed < 4, elapsed
  assert f"Cannot download 'tiny' from {url}: the download took longer than " \
         f"{hub.DOWNLOAD_TIMEOUT_ENV}=1 s (0 bytes so far); raise it for a slow link." \
         in str(e.value)
  assert files_in(cache) == [f"locks/{FILE}.lock"]  # no headers, so no part was started
  assert server.gets == [("CONNECT weights.invalid:443", None) if via_proxy else
                         ("/w.safetensors", None)]


def test_a_stalled_download_is_abandoned_below_the_minimum_rate(server, cache, monkeypatch):
  data = bytes(range(256)) * 2
  server.files["/w.safetensors"] = data
  server.trickle_s = 0.02
  register(monkeypatch, server.url + "/w.safetensors", data, size=len(data))
  monkeypatch.setattr(hub, "STALL_WINDOW_S", 0.5)
  monkeypatch.setenv(hub.MIN_RATE_ENV, "1000")
  started = time.monotonic()
  with pytest.raises(pretrained.WeightsError,
                     match=rf"stalled at \d+ bytes/s over 0\.[5-9] s, below {hub.MIN_RATE_ENV}=1000; "
                           r"lower it for a slow link"):
    pretrained.load(NAME)
  assert time.monotonic() - started < 5
  # A silent server, or one that trickles its headers, is caught by the same window.
  (cache / "downloads" / (FILE + ".part")).unlink()
  for server.trickle_s, server.delay_s, server.head_trickle_s in [(0, 3, 0), (0, 0, 0.3)]:
    started = time.monotonic()
    with pytest.raises(pretrained.WeightsError,
                       match=r"from \S+: the server sent no complete response headers in "
                             rf"0\.5 s, the stall window of {hub.MIN_RATE_ENV}=1000; set it to 0 "
                             r"for a slow server\. Without network"):
      pretrained.load(NAME)
    assert time.monotonic() - started < 2.5
    assert files_in(cache) == [f"locks/{FILE}.lock"]


@pytest.mark.parametrize("send_length", [False, True])
def test_a_body_longer_than_the_pinned_size_is_refused_at_size_plus_one(
    server, cache, weights, monkeypatch, send_length):
  _, data = weights
  server.files["/w.safetensors"] = data
  server.send_length, server.endless = send_length, True  # an endless body
  register(monkeypatch, server.url + "/w.safetensors", data, size=len(data) - 100)
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load(NAME)
  msg = str(e.value)
  limit = len(data) - 100
  said = f"announces {len(data)} bytes" if send_length else f"sent {limit + 1} bytes and more"
  assert f"{server.url}/w.safetensors {said} for {FILE}, more than its pinned size ({limit} " \
         f"bytes): refused and deleted, nothing cached" in msg
  assert files_in(cache) == [f"locks/{FILE}.lock"]
  if not send_length:
    assert server.sent < len(data) + (64 << 20)  # the server gave up once the client did


def test_without_a_pinned_size_the_model_bounds_the_download(server, cache, weights,
                                                             monkeypatch):
  _, data = weights
  server.files["/w.safetensors"] = data
  server.send_length = False
  source = register(monkeypatch, server.url + "/w.safetensors", data)
  assert source.max_bytes() == pretrained.common.size_bound("densenet40")
  # The real entries: none has a published size pinned, each is bounded by its model.
  for name in ("densenet121", "keras/densenet121", "densenet201"):
    real = hub.REGISTRY[name]
    assert real.size is None
    assert 32 << 20 <= real.max_bytes() <= 600 << 20, (name, real.max_bytes())
  monkeypatch.setattr(hub.common, "size_bound", lambda model: 1000)
  with pytest.raises(pretrained.WeightsError, match=r"sent 1001 bytes and more for .*, more "
                     r"than the bound for its model \(1000 bytes\)"):
    pretrained.load(NAME)


def test_the_lock_wait_is_bounded_and_names_the_holder(server, cache, weights, monkeypatch):
  _, data = weights
  server.files["/w.safetensors"] = data
  register(monkeypatch, server.url + "/w.safetensors", data)
  monkeypatch.setenv(hub.LOCK_TIMEOUT_ENV, "0.5")
  outcome = {}

  def load():
    try:
      pretrained.load(NAME)
    except pretrained.WeightsError as e:
      outcome["error"] = str(e)

  # flock locks belong to an open file, so a second open in this process is a second holder.
  with hub._locked(cache / "locks" / f"{FILE}.lock", FILE):
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "still waiting on the lock after 20 s"
  msg = outcome["error"]
  assert f"Waited 0.5 s for {cache / 'locks' / (FILE + '.lock')}, held by pid {os.getpid()} " \
         f"on host {socket.gethostname()}, started " in msg and f"while it fetches {FILE}" in msg
  assert f"if it is stuck, stop it; to wait longer, raise {hub.LOCK_TIMEOUT_ENV}" in msg
  assert server.gets == []
  assert (cache / "locks" / f"{FILE}.lock").read_text() == ""  # released: no stale pid
  assert_same(pretrained.load(NAME)[1], weights[0])


def test_bad_limits_in_the_environment_name_the_variable(cache, weights, monkeypatch):
  register(monkeypatch, "http://127.0.0.1:9/w.safetensors", weights[1])
  monkeypatch.setenv(hub.DOWNLOAD_TIMEOUT_ENV, "ten")
  with pytest.raises(pretrained.WeightsError, match=f"{hub.DOWNLOAD_TIMEOUT_ENV}='ten' is not a"
                     r" number of seconds or bytes/s >= 0; unset it for the default \(1800\)"):
    pretrained.load(NAME)


def test_prefix_pinned_sources_say_only_a_32_bit_prefix_is_checked(server, cache, weights,
                                                                   monkeypatch, capsys):
  flat, data = weights
  server.files["/w.safetensors"] = data
  source = register(monkeypatch, server.url + "/w.safetensors", data, digest_len=8)
  assert_same(pretrained.load(NAME)[1], flat)
  warning = (f"warning: 'tiny': only a 32-bit sha256 prefix ({source.digest}) is published for "
             f"{FILE}, so only that much of the file is checked.")
  err = capsys.readouterr().err
  assert warning in err.splitlines()
  assert all(not hub.REGISTRY[n].full_digest
             for n in ("torchvision/densenet161", "torchvision/densenet121"))
  register(monkeypatch, server.url + "/w.safetensors", data)  # the full digest: no warning
  monkeypatch.setattr(hub, "_warned_prefix", set())
  pretrained.load(NAME)
  assert "warning" not in capsys.readouterr().err


def test_a_full_digest_refuses_a_file_that_matches_only_its_prefix(server, cache, weights,
                                                                  monkeypatch, capsys):
  flat, data = weights
  server.files["/w.safetensors"] = data
  actual = hashlib.sha256(data).hexdigest()
  # What about 2**32 tries buy against a prefix pin: a file whose first 8 hex digits agree.
  pinned = actual[:8] + format(int(actual[8:], 16) ^ 1, "056x")
  source = dataclasses.replace(register(monkeypatch, server.url + "/w.safetensors", data),
                               digest=pinned)
  monkeypatch.setitem(hub.REGISTRY, NAME, source)
  assert source.full_digest
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.load(NAME)
  assert f"{FILE} from {server.url}/w.safetensors has sha256 {actual}, not the pinned sha256 " \
         f"{pinned}: refused and deleted, nothing cached" in str(e.value)
  assert files_in(cache) == [f"locks/{FILE}.lock"]
  assert "warning" not in capsys.readouterr().err  # a full pin has nothing to warn about
  register(monkeypatch, server.url + "/w.safetensors", data, digest_len=8)  # the prefix alone
  assert_same(pretrained.load(NAME)[1], flat)  # passes the very same file


def test_a_damaged_cached_checkpoint_is_rebuilt_or_named_for_deletion(server, cache, weights,
                                                                      monkeypatch, capsys):
  flat, data = weights
  server.files["/w.safetensors"] = data
  register(monkeypatch, server.url + "/w.safetensors", data)
  assert_same(pretrained.load(NAME)[1], flat)
  checkpoint = cache / "checkpoints" / "tiny-weights.npz"
  good = checkpoint.read_bytes()
  checkpoint.write_bytes(good[: len(good) // 2])  # a disk that filled up, a bad copy
  capsys.readouterr()
  assert_same(pretrained.load(NAME)[1], flat)
  assert f"{checkpoint} is damaged; rebuilding it from {cache / 'downloads' / FILE}" in (
      capsys.readouterr().err)
  assert checkpoint.read_bytes() == good and len(server.gets) == 1  # no new download

  checkpoint.write_bytes(good[: len(good) // 2])
  (cache / "downloads" / FILE).unlink()
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.read_checkpoint(NAME)
  assert f"The cached checkpoint of 'tiny' is damaged (Cannot read {checkpoint}" in str(e.value)
  assert f"delete {checkpoint} and load 'tiny' again to download and convert it" in str(e.value)
  checkpoint.unlink()  # as the message says
  assert_same(pretrained.load(NAME)[1], flat)
  assert len(server.gets) == 2
