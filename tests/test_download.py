"""The download cache (download.py): fetch, verify, keep; never touching the internet."""

import dataclasses
import hashlib
import http.server
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from tlflax import files, tree, weights
from tlflax.data import images
from tlflax.weights import download, registry
from tlflax.weights.merge import WeightsError
from tlflax.weights.registry import FileHash, PretrainedWeights

PAYLOAD = np.random.default_rng(0).bytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves `files` by path; "/truncated" promises more bytes than it sends."""
  files: dict = {}
  requests: list = []

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests.append(self.path)
    if self.path == "/truncated":
      self.send_response(200)
      self.send_header("Content-Length", str(len(PAYLOAD)))
      self.end_headers()
      self.wfile.write(PAYLOAD[:1000])
      self.close_connection = True
      return
    body = self.files.get(self.path)
    if body is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):  # keep test output quiet
    pass


@pytest.fixture(name="server")
def fixture_server():
  """A local HTTP server on 127.0.0.1; yields (base URL, handler class)."""
  handler = type("Handler", (_Handler,), {"files": {"/w.bin": PAYLOAD}, "requests": []})
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(name="cache")
def fixture_cache(tmp_path, monkeypatch):
  """An empty cache directory, also set as $TLFLAX_CACHE_DIR."""
  directory = tmp_path / "cache"
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(directory))
  return directory


def add_entry(monkeypatch, url, file_hash, weight_id="resnet18.test", file_name="w.bin"):
  """Registers a test entry for the duration of one test."""
  entry = PretrainedWeights(
      id=weight_id, model_name="resnet18", source="torchvision", url=url,
      file_name=file_name, hash=file_hash, hash_note="" if file_hash else "test: no hash",
      preprocessing=images.TORCH)
  monkeypatch.setitem(registry._ENTRIES, weight_id, entry)  # pylint: disable=protected-access
  return entry


def closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def files_in(directory) -> list[str]:
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def test_fetch_downloads_verifies_and_then_uses_the_cache(server, cache, monkeypatch):
  url, handler = server
  add_entry(monkeypatch, url + "/w.bin", FileHash("sha256", PAYLOAD_SHA256[:8], "test"))
  path = download.fetch("resnet18.test")
  assert path == os.path.join(str(cache), "w.bin")
  with open(path, "rb") as f:
    assert f.read() == PAYLOAD
  assert files_in(cache) == ["w.bin"]  # no temporary file left beside it
  assert download.fetch("resnet18.test") == path
  assert handler.requests == ["/w.bin"]  # the second fetch was a cache hit


def test_fetch_to_an_explicit_cache_dir_over_file_url(tmp_path, cache, monkeypatch):
  source = tmp_path / "published.bin"
  source.write_bytes(PAYLOAD)
  add_entry(monkeypatch, source.as_uri(), FileHash("sha256", PAYLOAD_SHA256, "test"))
  path = download.fetch("resnet18.test", cache_dir=tmp_path / "explicit")
  assert path == str(tmp_path / "explicit" / "w.bin")
  assert files_in(cache) == []


def test_hash_mismatch_names_both_hashes_and_leaves_no_file(server, cache, monkeypatch):
  url, _ = server
  add_entry(monkeypatch, url + "/w.bin", FileHash("sha256", "0123abcd", "test"))
  with pytest.raises(WeightsError) as error:
    download.fetch("resnet18.test")
  assert "0123abcd" in str(error.value) and PAYLOAD_SHA256 in str(error.value)
  assert files_in(cache) == []


def test_md5_is_verified_like_keras(server, cache, monkeypatch):
  url, _ = server
  add_entry(monkeypatch, url + "/w.bin", FileHash("md5", hashlib.md5(PAYLOAD).hexdigest(), "test"))
  assert os.path.getsize(download.fetch("resnet18.test")) == len(PAYLOAD)
  add_entry(monkeypatch, url + "/w.bin", FileHash("md5", "f" * 32, "test"), weight_id="resnet18.bad",
            file_name="bad.bin")
  with pytest.raises(WeightsError, match="md5"):
    download.fetch("resnet18.bad")
  assert files_in(cache) == ["w.bin"]


def test_a_cached_file_with_the_wrong_hash_is_downloaded_again(server, cache, monkeypatch):
  url, handler = server
  add_entry(monkeypatch, url + "/w.bin", FileHash("sha256", PAYLOAD_SHA256, "test"))
  cache.mkdir()
  (cache / "w.bin").write_bytes(b"a file that was only half written")
  path = download.fetch("resnet18.test")
  with open(path, "rb") as f:
    assert f.read() == PAYLOAD
  assert handler.requests == ["/w.bin"]


def test_unreachable_url_fails_at_once_naming_url_and_path(cache, monkeypatch):
  url = f"http://127.0.0.1:{closed_port()}/resnet18-f37072fd.pth"
  add_entry(monkeypatch, url, FileHash("sha256", "f37072fd", "test"))
  start = time.monotonic()
  with pytest.raises(WeightsError) as error:
    download.fetch("resnet18.test")
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert url in message and os.path.join(str(cache), "w.bin") in message
  assert "f37072fd" in message
  assert files_in(cache) == []


def test_http_error_is_reported(server, cache, monkeypatch):
  url, _ = server
  add_entry(monkeypatch, url + "/missing.bin", FileHash("sha256", "00", "test"))
  with pytest.raises(WeightsError, match="404"):
    download.fetch("resnet18.test")
  assert files_in(cache) == []


def test_truncated_download_leaves_no_file(server, cache, monkeypatch):
  url, _ = server
  add_entry(monkeypatch, url + "/truncated", None)  # no hash: only the length can tell
  with pytest.raises(WeightsError, match=f"1000 of {len(PAYLOAD)} bytes"):
    download.fetch("resnet18.test")
  assert files_in(cache) == []


def test_unhashed_download_is_kept_and_its_sha256_logged(server, cache, monkeypatch, caplog):
  url, _ = server
  add_entry(monkeypatch, url + "/w.bin", None)
  with caplog.at_level(logging.WARNING, logger=download.__name__):
    path = download.fetch("resnet18.test")
  assert os.path.getsize(path) == len(PAYLOAD)
  assert PAYLOAD_SHA256 in caplog.text


def test_load_by_id_end_to_end(tmp_path, server, cache, monkeypatch):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  published = tmp_path / "resnet18.pth"
  torch.save(torchvision.models.resnet18().state_dict(), published)
  body = published.read_bytes()
  url, handler = server
  handler.files["/resnet18-f37072fd.pth"] = body
  entry = registry.get("resnet18.tv_in1k")
  monkeypatch.setitem(registry._ENTRIES, entry.id, dataclasses.replace(  # pylint: disable=protected-access
      entry, url=url + "/resnet18-f37072fd.pth",
      hash=FileHash("sha256", hashlib.sha256(body).hexdigest()[:8], "test")))

  by_id = tree.flatten(weights.load("resnet18", "resnet18.tv_in1k"))
  by_file = tree.flatten(weights.load("resnet18", published, source="torchvision"))
  assert files_in(cache) == ["resnet18-f37072fd.pth"]
  assert by_id.keys() == by_file.keys()
  for key, value in by_file.items():
    np.testing.assert_array_equal(by_id[key], value, err_msg=key)


def test_unwritable_cache_is_reported(tmp_path, monkeypatch):
  add_entry(monkeypatch, "http://127.0.0.1:9/w.bin", FileHash("sha256", "00", "test"))
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(WeightsError, match="Cannot write to the download cache"):
    download.fetch("resnet18.test", cache_dir=tmp_path / "a_file" / "cache")


def test_cached_path_and_file_digest(tmp_path, cache, monkeypatch):
  add_entry(monkeypatch, "http://127.0.0.1:9/w.bin", FileHash("sha256", "00", "test"))
  assert download.cached_path("resnet18.test") == os.path.join(str(cache), "w.bin")
  assert download.cached_path("resnet18.test", tmp_path / "mine") == str(tmp_path / "mine" / "w.bin")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert download.cached_path("resnet18.tv_in1k", "~/weights") == str(
      tmp_path / "home" / "weights" / "resnet18-f37072fd.pth")
  with pytest.raises(WeightsError, match="Unknown pretrained weights 'nope.x'"):
    download.cached_path("nope.x")
  (tmp_path / "payload").write_bytes(PAYLOAD)
  assert download.file_digest(tmp_path / "payload") == PAYLOAD_SHA256
  assert download.file_digest(tmp_path / "payload", "md5") == hashlib.md5(PAYLOAD).hexdigest()
  assert files_in(cache) == []  # naming a path downloads nothing
