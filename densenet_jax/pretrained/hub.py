"""Pretrained weights by name: published files with pinned hashes, downloaded once per host,
verified before anything reads them, converted once and cached.

    DENSENET_JAX_CACHE   the cache root (default ~/.cache/densenet_jax)
    DENSENET_JAX_MIRROR  a URL prefix that replaces the original host: a file is fetched as
                         $DENSENET_JAX_MIRROR/<file name> (an internal mirror, air-gapped)

Cache layout: downloads/<file name> (the verified source file, kept), checkpoints/<stem>.npz
(the converted checkpoint that `load` reads), locks/<file name>.lock (one download per host:
concurrent processes wait for the first). A download goes to downloads/<file name>.part and
is renamed only after its hash matches; an interrupted one resumes with an HTTP Range request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import importlib.util
import os
import pathlib
import sys
import time
import urllib.error
import urllib.request
from typing import Iterator

from densenet_jax.pretrained import checkpoint, common, torchvision

CACHE_ENV = "DENSENET_JAX_CACHE"
MIRROR_ENV = "DENSENET_JAX_MIRROR"
DEFAULT_CACHE = "~/.cache/densenet_jax"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


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
    full = len(self.digest) == 2 * hashlib.new(self.algorithm).digest_size
    return f"{self.algorithm} {self.digest}" + ("" if full else " (published prefix)")


_TV = "https://download.pytorch.org/models/"
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
# timm's sha256 is the Git LFS object id on the Hugging Face file page.
_SOURCES = {
    "torchvision/densenet121": _torchvision("densenet121", "a639ec97"),
    "torchvision/densenet161": _torchvision("densenet161", "8d451a50"),
    "torchvision/densenet169": _torchvision("densenet169", "b2777c0a"),
    "torchvision/densenet201": _torchvision("densenet201", "c1103571"),
    # torchvision's densenet121 weights, republished by timm as .safetensors (no torch needed).
    "timm/densenet121": Source(
        "densenet121", "torchvision",
        "https://huggingface.co/timm/densenet121.tv_in1k/resolve/main/model.safetensors",
        "sha256", "c894c6d9caa317a8ca1942986dee7a16a86c77734a4d691d2abe05389cfef358",
        "Apache-2.0 (timm model card)", file_name="densenet121.tv_in1k.safetensors"),
    "keras/densenet121": _keras("densenet121", "9d60b8095a5708f2dcce2bca79d332c7"),
    "keras/densenet169": _keras("densenet169", "d699b8f76981ab1b30698df4c175e90b"),
    "keras/densenet201": _keras("densenet201", "1ceb130c1ea1b78c3bf6114dbdfd8807"),
    "keras/densenet121_notop": _keras("densenet121", "30ee3e1110167f948a6b9946edeeb738", True),
    "keras/densenet169_notop": _keras("densenet169", "b8c4d4c20dd625c148057b9ff1c1176b", True),
    "keras/densenet201_notop": _keras("densenet201", "c13680b51ded0fb44dff2d8f86ac8bb1", True),
}
# Bare names mean torchvision's weights (what torchvision's and timm's default is), from the
# torch-free copy where one is pinned.
REGISTRY: dict[str, Source] = _SOURCES | {
    "densenet121": _SOURCES["timm/densenet121"],
    "densenet161": _SOURCES["torchvision/densenet161"],
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


def fetch(name: str) -> pathlib.Path:
  """The cached checkpoint of a registered name: downloaded, verified and converted once."""
  source = REGISTRY[name]
  out = cache_dir() / "checkpoints" / f"{pathlib.Path(source.name).stem}.npz"
  if out.is_file():  # written by an atomic rename, so complete: no lock, no network
    return out
  if source.needs_torch and importlib.util.find_spec("torch") is None:
    alternatives = [n for n, s in REGISTRY.items()
                    if s.model == source.model and not s.needs_torch]
    instead = (f", or load {' / '.join(map(repr, alternatives))} (torch-free)"
               if alternatives else "; no torch-free file of this model is pinned")
    raise WeightsError(f"{name!r} is published as {source.name}, a PyTorch pickle that needs "
                       f"torch to read: pip install torch{instead}.")
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
  try:
    _download(url, part)
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


def _download(url: str, part: pathlib.Path) -> None:
  """Fetches url into part, resuming from part's size when the server honours Range."""
  start = part.stat().st_size if part.is_file() else 0
  request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
  try:
    response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
  except urllib.error.HTTPError as e:
    if e.code != 416 or not start:  # 416: the part is not shorter than the file: start over
      raise
    part.unlink()
    return _download(url, part)
  with response:
    resumed = response.status == 206
    done = start if resumed else 0  # a 200 answer to a Range request is the whole file
    length = response.headers.get("Content-Length")
    total = done + int(length) if length else None
    bar = _Progress(part.name.removesuffix(".part"), total)
    with open(part, "ab" if resumed else "wb") as f:
      while chunk := response.read(_CHUNK):
        f.write(chunk)
        done += len(chunk)
        bar.update(done)
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
  """Holds an exclusive lock on `path`, so one process per host downloads and converts."""
  import fcntl  # POSIX only; imported here so that loading from a path works everywhere

  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"waiting for another process to fetch {what} ...", file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
