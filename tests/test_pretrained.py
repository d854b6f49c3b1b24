"""The pretrained registry and the download cache (never touching the internet)."""

import dataclasses
import hashlib
import http.server
import inspect
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from tlflax import tree
from tlflax import models, weights
from tlflax.data import images
from tlflax import files
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


# ----------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------

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


def test_cache_dir_from_environment_or_home(tmp_path, monkeypatch):
  monkeypatch.setenv(files.CACHE_ENV_VAR, str(tmp_path / "elsewhere"))
  assert files.cache_dir() == str(tmp_path / "elsewhere")
  monkeypatch.delenv(files.CACHE_ENV_VAR)
  monkeypatch.setenv("HOME", str(tmp_path))
  assert files.cache_dir() == str(tmp_path / ".cache" / "tlflax")


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
  with caplog.at_level(logging.WARNING, logger=registry.__name__):
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


# ----------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------

def test_every_entry_is_complete_and_usable():
  entries = [registry.get(i) for i in registry.list_ids()]
  assert len(entries) >= 30
  file_names = [e.file_name for e in entries]
  assert len(set(file_names)) == len(file_names), "two entries would share a cache file"
  for e in entries:
    assert e.model_name in models.model_names(), e.id
    assert e.id.startswith(e.model_name + "."), e.id
    assert e.source in weights.SOURCES, e.id
    assert e.url.startswith("https://"), e.id
    assert e.hash is not None or e.hash_note, e.id
    if e.hash is not None:
      assert e.hash.algorithm in ("sha256", "md5") and int(e.hash.hex_digest, 16) >= 0, e.id
    expected_classes = 10 if e.class_names == "cifar10" else 1000
    assert len(registry.class_names(e.class_names)) == expected_classes, e.id


def test_imagenet_class_names_ship_with_the_package():
  names = registry.class_names("imagenet1k")
  assert len(names) == len(set(names)) == 1000
  assert names[0] == "tench" and names[-1] == "toilet tissue"


def test_unknown_id_suggests_close_ones():
  with pytest.raises(WeightsError, match="resnet50.tv_in1k"):
    registry.get("resnet50.tv_imagenet")
  assert not registry.is_known("resnet50-0676ba61.pth")


def test_torchvision_entries_match_installed_torchvision():
  tv_models = pytest.importorskip("torchvision.models")
  # The CIFAR ResNets are read by the torchvision converter but not published by it.
  entries = [i for i in registry.list_ids(source="torchvision") if ".tv" in i]
  assert len(entries) == 20
  for weight_id in entries:
    entry = registry.get(weight_id)
    version = {"tv_in1k": "IMAGENET1K_V1", "tv2_in1k": "IMAGENET1K_V2"}[weight_id.split(".")[1]]
    published = tv_models.get_model_weights(entry.model_name)[version]
    transforms = published.transforms()
    assert entry.url == published.url
    assert entry.reported_top1 == published.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert entry.preprocessing == images.Preprocessing(
        crop_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
        interpolation=transforms.interpolation.value, mean=transforms.mean, std=transforms.std)


def test_keras_entries_match_keras_source():
  resnet = pytest.importorskip("keras.src.applications.resnet")
  from keras.src.applications import vgg16, vgg19  # pylint: disable=import-outside-toplevel
  for model in ("resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2", "resnet152v2"):
    entry = registry.get(f"keras_{model}.in1k")
    assert entry.url == (f"{resnet.BASE_WEIGHTS_PATH}{model}"
                         "_weights_tf_dim_ordering_tf_kernels.h5")
    assert entry.hash == FileHash("md5", resnet.WEIGHTS_HASHES[model][0], entry.hash.origin)
    assert entry.preprocessing == (images.TF if model.endswith("v2") else images.CAFFE)
  for module in (vgg16, vgg19):
    entry = registry.get(f"keras_{module.__name__.rsplit('.', 1)[1]}.in1k")
    assert entry.url == module.WEIGHTS_PATH
    assert f'file_hash="{entry.hash.hex_digest}"' in inspect.getsource(module)


def test_timm_entries_match_installed_timm():
  timm_models = pytest.importorskip("timm.models")
  for weight_id in registry.list_ids(source="timm"):
    entry = registry.get(weight_id)
    config = timm_models.get_pretrained_cfg(weight_id).to_dict()
    assert entry.url == f"https://huggingface.co/{config['hf_hub_id']}/resolve/main/model.safetensors"
    size = config["input_size"][-1]
    assert entry.preprocessing == images.Preprocessing(
        crop_size=size, resize_size=int(size / config["crop_pct"]),
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"])


def test_unwritable_cache_is_reported(tmp_path, monkeypatch):
  add_entry(monkeypatch, "http://127.0.0.1:9/w.bin", FileHash("sha256", "00", "test"))
  (tmp_path / "a_file").write_text("not a folder")
  with pytest.raises(WeightsError, match="Cannot write to the download cache"):
    download.fetch("resnet18.test", cache_dir=tmp_path / "a_file" / "cache")
