"""Pretrained weights by name: published files with pinned hashes, downloaded once per host,
verified before anything reads them, converted once and cached.

    DENSENET_JAX_CACHE   the cache root (default ~/.cache/densenet_jax)
    DENSENET_JAX_MIRROR  a URL prefix that replaces the original host: a file is fetched as
                         $DENSENET_JAX_MIRROR/<file name> (an internal mirror, air-gapped)
    DENSENET_JAX_DOWNLOAD_TIMEOUT  seconds one download may take in all: connecting, the
                         response headers and the body (default 1800)
    DENSENET_JAX_MIN_RATE  bytes/s a download must average over every 30 s, else it is
                         abandoned as stalled; the response headers must be in within the
                         first 30 s (default 10000; 0 turns the check off)
    DENSENET_JAX_LOCK_TIMEOUT  seconds to wait for another process's download and conversion
                         of the same file (default: the download timeout plus 600)

Cache layout: downloads/<file name> (the verified source file, kept), checkpoints/<stem>.npz
(the converted checkpoint that `load` reads), locks/<file name>.lock (one download per host:
concurrent processes wait for the first; the holder's pid is in the file). A download goes to
downloads/<file name>.part and is renamed only after its hash matches; an interrupted one
resumes with an HTTP Range request. No download reads more than its entry's size (or, where no
size is pinned, a bound derived from the model's variables), whatever the server announces.
A damaged cached checkpoint is rebuilt from the kept download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.util
import os
import pathlib
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Iterator, TypeVar

from densenet_jax import locking
from densenet_jax.pretrained import checkpoint, common, torchvision

CACHE_ENV = "DENSENET_JAX_CACHE"
MIRROR_ENV = "DENSENET_JAX_MIRROR"
DOWNLOAD_TIMEOUT_ENV = "DENSENET_JAX_DOWNLOAD_TIMEOUT"
MIN_RATE_ENV = "DENSENET_JAX_MIN_RATE"
LOCK_TIMEOUT_ENV = "DENSENET_JAX_LOCK_TIMEOUT"
DEFAULT_CACHE = "~/.cache/densenet_jax"
DEFAULT_DOWNLOAD_TIMEOUT_S = 1800.0  # the largest file (~110 MB) at 60 kB/s
DEFAULT_MIN_RATE = 10_000.0  # bytes/s
STALL_WINDOW_S = 30.0  # the rate is averaged over this long, so short pauses pass
_CONVERT_ALLOWANCE_S = 600.0  # a waiter also waits for the holder's conversion
_CHUNK = 1 << 20
_TIMEOUT_S = 60  # per socket operation; the watchdog and stall check bound the whole download
_warned_prefix: set[str] = set()
T = TypeVar("T")


class WeightsError(RuntimeError):
  """Named weights cannot be had (offline, refused hash, missing torch); the message says
  what was tried and what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
  """One published weight file: where it lives, its pinned hash and how to read it."""
  model: str  # the densenet_jax preset it fits
  framework: str  # the reader: 'torchvision' or 'keras'
  url: str
  algorithm: str  # a hashlib name
  # Hex digest as published; shorter than the algorithm's means a published prefix
  # (torchvision names its files with the first 8 hex digits of their sha256).
  digest: str
  license: str
  file_name: str = ""  # when the URL's last part is not unique (Hugging Face's model.safetensors)
  size: int | None = None  # bytes, where the publisher's exact size is known

  @property
  def full_digest(self) -> bool:
    """Whether the whole digest is pinned, not only a published prefix."""
    return len(self.digest) == 2 * hashlib.new(self.algorithm).digest_size

  def max_bytes(self) -> int:
    """The most bytes a download may have: the pinned size, else a bound from the model."""
    return self.size if self.size is not None else common.size_bound(self.model)

  @property
  def name(self) -> str:
    """The file's name in the cache and on a mirror."""
    return self.file_name or self.url.rsplit("/", 1)[-1]

  @property
  def needs_torch(self) -> bool:
    """Whether reading it needs PyTorch (a pickle-based .pth rather than .safetensors/.h5)."""
    return self.name.endswith(torchvision.TORCH_SUFFIXES)

  def check(self, path: pathlib.Path) -> str | None:
    """None when the file's hash matches the pinned one, else its actual digest."""
    h = hashlib.new(self.algorithm)
    with open(path, "rb") as f:
      while chunk := f.read(_CHUNK):
        h.update(chunk)
    actual = h.hexdigest()
    return None if actual.startswith(self.digest) else actual

  def pinned(self) -> str:
    """The pinned hash in words, prefix or not."""
    return f"{self.algorithm} {self.digest}" + ("" if self.full_digest else " (published prefix)")


_TV = "https://download.pytorch.org/models/"
_HF = "https://huggingface.co/timm/"
_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/densenet/"
_KERAS_FILE = "{}_weights_tf_dim_ordering_tf_kernels{}.h5"
_TV_LICENSE = "BSD-3-Clause (torchvision)"
_KERAS_LICENSE = "Apache-2.0 (Keras)"


def _torchvision(model: str, prefix: str) -> Source:
  return Source(model, "torchvision", f"{_TV}{model}-{prefix}.pth", "sha256", prefix, _TV_LICENSE)


def _keras(model: str, md5: str, notop: bool = False) -> Source:
  url = _KERAS + _KERAS_FILE.format(model, "_notop" if notop else "")
  return Source(model, "keras", url, "md5", md5, _KERAS_LICENSE)


# Hashes are the publishers' own: torchvision's sha256 prefixes are in its file names (torch.hub
# checks only those); Keras' md5s are the file_hash values in keras/src/applications/densenet.py;
# timm's sha256s are the Git LFS object ids on the Hugging Face file pages named below. No exact
# sizes are pinned: those pages round them (32.3 MB), so downloads are bounded by
# common.size_bound instead (a few times the model's float32 bytes).
_SOURCES = {
    "torchvision/densenet121": _torchvision("densenet121", "a639ec97"),
    "torchvision/densenet161": _torchvision("densenet161", "8d451a50"),
    "torchvision/densenet169": _torchvision("densenet169", "b2777c0a"),
    "torchvision/densenet201": _torchvision("densenet201", "c1103571"),
    # torchvision's densenet121 weights, republished by timm as .safetensors (no torch needed);
    # sha256 from https://huggingface.co/timm/densenet121.tv_in1k/blob/main/model.safetensors
    "timm/densenet121": Source(
        "densenet121", "torchvision", f"{_HF}densenet121.tv_in1k/resolve/main/model.safetensors",
        "sha256", "c894c6d9caa317a8ca1942986dee7a16a86c77734a4d691d2abe05389cfef358",
        "Apache-2.0 (timm model card)", file_name="densenet121.tv_in1k.safetensors"),
    # torchvision's densenet161 weights as timm republished them: still a torch pickle, but
    # fully hashed. timm's DenseNet keeps torchvision's module names (features.denseblockN.
    # denselayerM.norm1, ..., classifier; BatchNormAct2d is an nn.BatchNorm2d), so the file reads
    # like torchvision's own. sha256 from https://huggingface.co/timm/densenet161.tv_in1k/blob/
    # 359c7ecf29a2da61381f4725fe59889ca80ad29b/pytorch_model.bin, the commit the URL pins (no
    # published sha256 of timm's 161 .safetensors, nor of its 169/201 files, could be found).
    "timm/densenet161": Source(
        "densenet161", "torchvision",
        f"{_HF}densenet161.tv_in1k/resolve/359c7ecf29a2da61381f4725fe59889ca80ad29b/"
        "pytorch_model.bin",
        "sha256", "f9ee24e6d30ab3405d9c468040f74e2de66675126eee9ec9ec15826b5a0619d3",
        "Apache-2.0 (timm model card)", file_name="densenet161.tv_in1k.bin"),
    "keras/densenet121": _keras("densenet121", "9d60b8095a5708f2dcce2bca79d332c7"),
    "keras/densenet169": _keras("densenet169", "d699b8f76981ab1b30698df4c175e90b"),
    "keras/densenet201": _keras("densenet201", "1ceb130c1ea1b78c3bf6114dbdfd8807"),
    "keras/densenet121_notop": _keras("densenet121", "30ee3e1110167f948a6b9946edeeb738", True),
    "keras/densenet169_notop": _keras("densenet169", "b8c4d4c20dd625c148057b9ff1c1176b", True),
    "keras/densenet201_notop": _keras("densenet201", "c13680b51ded0fb44dff2d8f86ac8bb1", True),
}
# Bare names mean torchvision's weights (what torchvision's and timm's default is), from a
# fully hashed copy where one is pinned, and a torch-free one first.
REGISTRY: dict[str, Source] = _SOURCES | {
    "densenet121": _SOURCES["timm/densenet121"],
    "densenet161": _SOURCES["timm/densenet161"],
    "densenet169": _SOURCES["torchvision/densenet169"],
    "densenet201": _SOURCES["torchvision/densenet201"],
}


def cache_dir() -> pathlib.Path:
  """$DENSENET_JAX_CACHE, else ~/.cache/densenet_jax."""
  return pathlib.Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def resolve(weights: common.PathLike) -> pathlib.Path:
  """The checkpoint file for a path or a registered name (fetched and converted once)."""
  path = pathlib.Path(weights)
  if path.is_file() or str(weights) not in REGISTRY:
    if not path.exists() and not path.suffix:  # neither a file nor a known name
      raise FileNotFoundError(f"No checkpoint file {str(weights)!r}, and no pretrained weights "
                              f"of that name; the names are: {', '.join(REGISTRY)}.")
    return path
  return fetch(str(weights))


def resolve_and_read(weights: common.PathLike, read: Callable[[pathlib.Path], T]) -> T:
  """read(the checkpoint of a path or name); a damaged cached checkpoint is rebuilt once."""
  path = resolve(weights)
  try:
    return read(path)
  except ValueError as e:
    name = str(weights)
    if name not in REGISTRY or path != _checkpoint_path(REGISTRY[name]):
      raise  # the user's own file: only they know where it came from
    _rebuild(name, path, e)
  return read(path)


def _checkpoint_path(source: Source) -> pathlib.Path:
  return cache_dir() / "checkpoints" / f"{pathlib.Path(source.name).stem}.npz"


def _rebuild(name: str, out: pathlib.Path, error: Exception) -> None:
  """Reconverts a cached checkpoint that cannot be read from its kept, re-verified download."""
  source = REGISTRY[name]
  target = cache_dir() / "downloads" / source.name
  reason = str(error).split("\n")[0]
  with _locked(cache_dir() / "locks" / f"{source.name}.lock", source.name):
    if not target.is_file():
      raise WeightsError(
          f"The cached checkpoint of {name!r} is damaged ({reason}), and the file it was "
          f"converted from is no longer in the cache: delete {out} and load {name!r} again "
          f"to download and convert it afresh.") from error
    print(f"{out} is damaged; rebuilding it from {target}", file=sys.stderr, flush=True)
    _verify(source, target, f"{target} (already in the cache)")
    checkpoint.convert(source.framework, target, out, source.model)


def fetch(name: str) -> pathlib.Path:
  """The cached checkpoint of a registered name: downloaded, verified and converted once."""
  source = REGISTRY[name]
  out = _checkpoint_path(source)
  if not source.full_digest and source.name not in _warned_prefix:
    # Said once per process, on every route (cached or not): the weakness is the pin's.
    _warned_prefix.add(source.name)
    bits = 4 * len(source.digest)
    same = [n for n, s in _SOURCES.items() if s.full_digest and s.model == source.model
            and s.framework == source.framework]  # the same weights, republished
    instead = f" {same[0]!r} has the same weights, fully hashed." if same else ""
    print(f"warning: {name!r}: only a {bits}-bit {source.algorithm} prefix ({source.digest}) "
          f"is published for {source.name}, so only that much of the file is checked.{instead}",
          file=sys.stderr, flush=True)
  if out.is_file():  # written by an atomic rename, so complete: no lock, no network
    return out
  if source.needs_torch and importlib.util.find_spec("torch") is None:
    alternatives = [n for n, s in REGISTRY.items()
                    if s.model == source.model and not s.needs_torch]
    instead = (f", or load {' / '.join(map(repr, alternatives))} (torch-free)"
               if alternatives else "; no torch-free file of this model is pinned")
    raise WeightsError(f"{name!r} is published as {source.name}, a PyTorch pickle that needs "
                       f"torch to read: pip install torch{instead}.")
  # Before downloading: a missing reader would only fail once the file is in.
  if source.name.endswith(".safetensors"):
    common.require("safetensors.numpy", f"Loading {name!r} ({source.name})")
  elif source.framework == "keras":
    common.require("h5py", f"Loading {name!r} ({source.name})")
  with _locked(cache_dir() / "locks" / f"{source.name}.lock", source.name):
    if not out.is_file():  # another process may have finished it while this one waited
      out.parent.mkdir(parents=True, exist_ok=True)
      checkpoint.convert(source.framework, download(name), out, source.model)
  return out


def download(name: str) -> pathlib.Path:
  """The verified source file of a registered name, downloaded if not yet in the cache."""
  source = REGISTRY[name]
  target = cache_dir() / "downloads" / source.name
  if target.is_file():  # kept from an earlier download, or put there by hand
    _verify(source, target, f"{target} (already in the cache)")
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  mirror = os.environ.get(MIRROR_ENV)
  url = f"{mirror.rstrip('/')}/{source.name}" if mirror else source.url
  part = target.with_name(target.name + ".part")
  limit = source.max_bytes()
  try:
    _download(url, part, limit, _Budget())
  except _TooLarge as e:
    part.unlink(missing_ok=True)
    pinned = "its pinned size" if source.size is not None else "the bound for its model"
    raise WeightsError(
        f"{url} {e} for {source.name}, more than {pinned} ({limit} bytes): refused and "
        f"deleted, nothing cached. A mirror or proxy may be serving another file.") from None
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    # A plain URLError wraps the socket error; an HTTPError's own text has the status code.
    reason = e.reason if type(e) is urllib.error.URLError else e
    kept = (f" The partial download is kept at {part} and resumes on the next try."
            if part.is_file() and part.stat().st_size else "")
    origin = f" (or {source.url})" if mirror else ""
    raise WeightsError(
        f"Cannot download {name!r} from {url}: {reason}.{kept} Without network access, copy "
        f"{source.name} from {url}{origin} to {target} by hand; it is checked against "
        f"{source.pinned()} before use. With an internal mirror, set {MIRROR_ENV} to the "
        f"URL prefix that serves {source.name}.") from e
  _verify(source, part, url)
  os.replace(part, target)
  return target


def _verify(source: Source, path: pathlib.Path, origin: str) -> None:
  """Deletes the file and raises unless its hash is the pinned one."""
  actual = source.check(path)
  if actual is not None:
    path.unlink()
    raise WeightsError(f"{source.name} from {origin} has {source.algorithm} {actual}, not the "
                       f"pinned {source.pinned()}: refused and deleted, nothing cached. A "
                       f"mirror or proxy may be serving another file.")


class _TooLarge(Exception):
  """The server sent, or announced, more bytes than the file can have."""


class _TooSlow(OSError):
  """The download passed its deadline or fell below the minimum rate (the part is kept)."""


def _env_number(name: str, default: float) -> float:
  """A non-negative number from the environment, or a WeightsError naming the variable."""
  text = os.environ.get(name, "").strip()
  if not text:
    return default
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0:  # also refuses nan
    raise WeightsError(f"{name}={text!r} is not a number of seconds or bytes/s >= 0; unset it "
                       f"for the default ({default:g}).")
  return value


class _Budget:
  """The download's overall deadline and its minimum-rate stall check."""

  def __init__(self):
    self.timeout = _env_number(DOWNLOAD_TIMEOUT_ENV, DEFAULT_DOWNLOAD_TIMEOUT_S)
    self.min_rate = _env_number(MIN_RATE_ENV, DEFAULT_MIN_RATE)
    self.deadline = time.monotonic() + self.timeout
    self.window_start, self.window_done = time.monotonic(), 0

  def socket_timeout(self) -> float:
    """Per socket operation: no longer than the deadline or a stall window allows."""
    longest = min(_TIMEOUT_S, max(self.deadline - time.monotonic(), 0.01))
    return min(longest, STALL_WINDOW_S) if self.min_rate else longest

  def headers_due(self) -> float:
    """Seconds from now by which the response headers must be in."""
    now = time.monotonic()
    if self.min_rate:  # a few hundred bytes: any live server sends them within one window
      return min(self.deadline, self.window_start + STALL_WINDOW_S) - now
    return self.deadline - now

  def cut_off(self, done: int) -> _TooSlow:
    """Why the watchdog ended the download: the deadline, or headers slower than a window."""
    if time.monotonic() >= self.deadline:
      return _TooSlow(f"the download took longer than {DOWNLOAD_TIMEOUT_ENV}={self.timeout:g} s "
                      f"({done} bytes so far); raise it for a slow link")
    return _TooSlow(f"the server sent no complete response headers in {STALL_WINDOW_S:g} s, "
                    f"the stall window of {MIN_RATE_ENV}={self.min_rate:g}; set it to 0 for a "
                    f"slow server")

  def check(self, done: int) -> None:
    """Raises _TooSlow when the last window averaged below min_rate."""
    now = time.monotonic()
    if now - self.window_start >= STALL_WINDOW_S:
      rate = (done - self.window_done) / (now - self.window_start)
      if rate < self.min_rate:
        raise _TooSlow(f"the download stalled at {rate:.0f} bytes/s over "
                       f"{now - self.window_start:.1f} s, below {MIN_RATE_ENV}="
                       f"{self.min_rate:g}; lower it for a slow link")
      self.window_start, self.window_done = now, done


class _Watchdog:
  """Shuts a download's connections down when its time is up, so that no proxy tunnel, TLS
  handshake, header or body read outlasts the budget, however slowly its bytes trickle in (the
  TCP connect itself is bounded by the socket timeout, never longer than the time left)."""

  def __init__(self):
    self.fired = False
    self.due = float("inf")
    self._lock = threading.Lock()
    self._sockets: list[socket.socket] = []
    self._timer: threading.Timer | None = None

  def arm(self, seconds: float) -> None:
    """Fires `seconds` from now, instead of any earlier setting."""
    if self._timer:
      self._timer.cancel()
    self.due = time.monotonic() + seconds
    self._timer = threading.Timer(max(seconds, 0.0), self._fire)
    self._timer.daemon = True
    self._timer.start()

  @property
  def expired(self) -> bool:
    """Whether the time is up: a socket timeout may end a read just before the timer fires."""
    return self.fired or time.monotonic() >= self.due

  def watch(self, sock: socket.socket) -> socket.socket:
    """Registers a new connection's socket (shut at once if the time is already up)."""
    with self._lock:
      # A duplicate descriptor: shutting it down ends the connection for whoever reads it (TLS
      # detaches the original socket object), and its number cannot be reused while held.
      self._sockets.append(sock.dup())
      if self.fired:
        self._sockets[-1].shutdown(socket.SHUT_RDWR)
    return sock

  def _fire(self) -> None:
    with self._lock:
      self.fired = True
      for sock in self._sockets:
        with contextlib.suppress(OSError):  # already closed by the other end
          sock.shutdown(socket.SHUT_RDWR)

  def close(self) -> None:
    if self._timer:
      self._timer.cancel()
    with self._lock:
      for sock in self._sockets:
        sock.close()

  def open(self, request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
    """urlopen(request), with every connection it makes (redirects too) watched."""
    return urllib.request.build_opener(_WatchedHTTP(self), _WatchedHTTPS(self)).open(
        request, timeout=timeout)


class _Watched(urllib.request.AbstractHTTPHandler):
  """An HTTP(S) handler whose connections give their sockets to a watchdog as they open."""

  def __init__(self, watchdog: _Watchdog):
    super().__init__()
    self.watchdog = watchdog

  def do_open(self, http_class: type[http.client.HTTPConnection], req: urllib.request.Request,
              **kwargs) -> http.client.HTTPResponse:
    def connection(*args, **kw) -> http.client.HTTPConnection:
      conn = http_class(*args, **kw)
      # http.client's own hook for making the TCP connection (before any TLS or proxy tunnel).
      conn._create_connection = lambda *a: self.watchdog.watch(socket.create_connection(*a))
      return conn
    return super().do_open(connection, req, **kwargs)


class _WatchedHTTP(_Watched, urllib.request.HTTPHandler):
  pass


class _WatchedHTTPS(_Watched, urllib.request.HTTPSHandler):
  pass


def _download(url: str, part: pathlib.Path, limit: int, budget: _Budget) -> None:
  """Fetches url into part, resuming from part's size when the server honours Range; never
  reads more than limit + 1 bytes of the file, nor past the budget."""
  watchdog = _Watchdog()
  try:
    _get(url, part, limit, budget, watchdog)
  except (OSError, http.client.HTTPException):  # what a shut connection can raise
    if not watchdog.expired:
      raise
  else:
    if not watchdog.fired:  # when it has, the body's end may have been the cut
      return
  finally:
    watchdog.close()
  # Whatever the cut looked like to the reader (an error, a short or an empty answer).
  raise budget.cut_off(part.stat().st_size if part.is_file() else 0)


def _get(url: str, part: pathlib.Path, limit: int, budget: _Budget, watchdog: _Watchdog) -> None:
  """_download's request and reading, under the watchdog."""
  start = part.stat().st_size if part.is_file() else 0
  if start > limit:  # left by an older version or another file: cannot be a prefix
    part.unlink()
    start = 0
  request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
  watchdog.arm(budget.headers_due())
  try:
    response = watchdog.open(request, timeout=budget.socket_timeout())
  except urllib.error.HTTPError as e:
    if e.code != 416 or not start:  # 416: the part is not shorter than the file: start over
      raise
    part.unlink()
    return _get(url, part, limit, budget, watchdog)
  watchdog.arm(budget.deadline - time.monotonic())
  with response:
    resumed = response.status == 206
    done = start if resumed else 0  # a 200 answer to a Range request is the whole file
    length = response.headers.get("Content-Length")
    total = done + int(length) if length and length.isdigit() else None
    if total is not None and total > limit:
      raise _TooLarge(f"announces {total} bytes")
    bar = _Progress(part.name.removesuffix(".part"), total)
    budget.window_done = done
    with open(part, "ab" if resumed else "wb") as f:
      # read1 returns what has arrived, so a trickle cannot hold one call until a whole chunk
      # is in; one byte past the limit is enough to know the file is not the published one.
      while chunk := response.read1(min(_CHUNK, limit + 1 - done)):
        f.write(chunk)
        done += len(chunk)
        bar.update(done)
        if done > limit:
          bar.close(done)
          raise _TooLarge(f"sent {done} bytes and more")
        budget.check(done)
    bar.close(done)
  if total is not None and done != total:
    raise OSError(f"the connection closed after {done} of {total} bytes")


class _Progress:
  """A one-line progress bar on stderr, redrawn at most every 0.2 s."""

  def __init__(self, name: str, total: int | None):
    self.name, self.total, self.last = name, total, 0.0

  def update(self, done: int) -> None:
    now = time.monotonic()
    if now - self.last >= 0.2:
      self.last = now
      self._draw(done)

  def close(self, done: int) -> None:
    self._draw(done)
    sys.stderr.write("\n")

  def _draw(self, done: int) -> None:
    of = f" / {self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)" if self.total else " MB"
    sys.stderr.write(f"\rdownloading {self.name}: {done / 1e6:.1f}{of}")
    sys.stderr.flush()


@contextlib.contextmanager
def _locked(path: pathlib.Path, what: str) -> Iterator[None]:
  """Holds an exclusive lock on `path`, so one process per host downloads and converts; waits
  at most $DENSENET_JAX_LOCK_TIMEOUT seconds for another holder."""
  default = _env_number(DOWNLOAD_TIMEOUT_ENV, DEFAULT_DOWNLOAD_TIMEOUT_S) + _CONVERT_ALLOWANCE_S
  timeout = _env_number(LOCK_TIMEOUT_ENV, default)
  path.parent.mkdir(parents=True, exist_ok=True)
  say = lambda holder: print(f"waiting for another process to fetch {what} ({holder}; at most "
                             f"{timeout:g} s, {LOCK_TIMEOUT_ENV}) ...", file=sys.stderr, flush=True)
  lock = contextlib.ExitStack()
  try:
    lock.enter_context(locking.exclusive(path, timeout, on_wait=say))
  except locking.Busy as e:
    raise WeightsError(
        f"Waited {timeout:g} s for {path}, held by {e.holder} while it fetches {what}. A lock "
        f"ends with its process, so that process is still running: if it is stuck, stop it; to "
        f"wait longer, raise {LOCK_TIMEOUT_ENV}.") from None
  with lock:
    yield
