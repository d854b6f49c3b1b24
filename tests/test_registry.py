"""The registry of known pretrained weights (registry.py): complete, true to the publishers."""

import dataclasses
import inspect

import pytest

from tlflax import models, weights
from tlflax.data import images
from tlflax.weights import registry
from tlflax.weights.merge import WeightsError
from tlflax.weights.registry import FileHash


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


def first_families(weight_ids):
  """The ids of the ResNets and VGGs; every later family's test file checks its own."""
  return [i for i in weight_ids
          if models.registry.family_of(models.get_model(registry.get(i).model_name)) is None]


def test_torchvision_entries_match_installed_torchvision():
  tv_models = pytest.importorskip("torchvision.models")
  # The CIFAR ResNets are read by the torchvision converter but not published by it.
  entries = [i for i in first_families(registry.list_ids(source="torchvision")) if ".tv" in i]
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
  for weight_id in first_families(registry.list_ids(source="timm")):
    entry = registry.get(weight_id)
    config = timm_models.get_pretrained_cfg(weight_id).to_dict()
    assert entry.url == f"https://huggingface.co/{config['hf_hub_id']}/resolve/main/model.safetensors"
    size = config["input_size"][-1]
    assert entry.preprocessing == images.Preprocessing(
        crop_size=size, resize_size=int(size / config["crop_pct"]),
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"])


# ----------------------------------------------------------------------------
# Looking up, registering, hashes
# ----------------------------------------------------------------------------

@pytest.fixture(name="own_registry")
def fixture_own_registry(monkeypatch):
  """The registry's entries as a copy that this test may change."""
  monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))  # pylint: disable=protected-access


def test_list_ids_by_model_and_source():
  assert registry.list_ids("resnet50") == ["resnet50.a1_in1k", "resnet50.tv2_in1k",
                                           "resnet50.tv_in1k"]
  assert registry.list_ids("cifar_resnet20") == ["cifar_resnet20.akamaster_c10"]
  assert registry.list_ids("resnet50", source="timm") == ["resnet50.a1_in1k"]
  assert first_families(registry.list_ids(source="keras")) == [
      "keras_resnet101.in1k", "keras_resnet101v2.in1k", "keras_resnet152.in1k",
      "keras_resnet152v2.in1k", "keras_resnet50.in1k", "keras_resnet50v2.in1k",
      "keras_vgg16.in1k", "keras_vgg19.in1k"]
  assert registry.list_ids("no_such_model") == []
  assert registry.list_ids() == sorted(registry.list_ids())


def test_an_id_without_close_matches_points_to_list_ids():
  with pytest.raises(WeightsError, match=r"^Unknown pretrained weights 'zzz'\. See "
                                         r"tlflax\.weights\.registry\.list_ids\(\)\.$"):
    registry.get("zzz")
  assert registry.is_known("resnet18.tv_in1k") and not registry.is_known(None)


def test_file_hash_matches_a_prefix_in_any_case_and_says_so():
  prefix = FileHash("sha256", "F37072fd", "test")
  assert prefix.matches("f37072fd" + "0" * 56) and prefix.matches("F37072FDAB")
  assert not prefix.matches("f37072fe" + "0" * 56) and not prefix.matches("f370")
  assert str(prefix) == "sha256 starting with F37072fd"
  assert str(FileHash("md5", "a" * 32, "test")) == "md5 " + "a" * 32
  assert str(registry.get("resnet18.tv_in1k").hash) == "sha256 starting with f37072fd"


def test_register_refuses_duplicates_and_unexplained_missing_hashes(own_registry):
  mine = dataclasses.replace(registry.get("resnet18.tv_in1k"), id="resnet18.mine",
                             url="https://example.org/r18.pth", file_name="r18.pth")
  registry.register(mine)
  assert registry.get("resnet18.mine") is mine
  assert registry.list_ids("resnet18") == ["resnet18.a1_in1k", "resnet18.mine", "resnet18.tv_in1k"]
  moved = dataclasses.replace(mine, url="https://example.org/moved.pth")
  with pytest.raises(WeightsError, match="'resnet18.mine' is already registered; pass replace=True"):
    registry.register(moved)
  assert registry.get("resnet18.mine") is mine
  registry.register(moved, replace=True)
  assert registry.get("resnet18.mine") is moved
  with pytest.raises(WeightsError, match="'resnet18.nohash': give a hash, or a hash_note"):
    registry.register(dataclasses.replace(mine, id="resnet18.nohash", hash=None))
  assert not registry.is_known("resnet18.nohash")
  registry.register(dataclasses.replace(mine, id="resnet18.nohash", hash=None,
                                        hash_note="our own server"))
  assert registry.get("resnet18.nohash").hash is None


def test_a_hand_downloaded_file_finds_its_entry_by_name():
  assert registry.matching_entry("resnet50", "/downloads/resnet50-0676ba61.pth") is (
      registry.get("resnet50.tv_in1k"))
  assert registry.matching_entry("resnet50", "resnet50-11ad3fa6.pth").id == "resnet50.tv2_in1k"
  # Another model's file, or an unknown name, has no entry.
  assert registry.matching_entry("resnet18", "resnet50-0676ba61.pth") is None
  assert registry.matching_entry("resnet50", "renamed.pth") is None


def test_default_preprocessing_is_the_first_entrys_else_torchvisions():
  assert registry.default_preprocessing("keras_vgg16") == images.CAFFE
  assert registry.default_preprocessing("keras_resnet50v2") == images.TF
  # torchvision is registered before timm: its 256 -> 224, not timm's bicubic 235 -> 224.
  assert registry.default_preprocessing("resnet50") == registry.get("resnet50.tv_in1k").preprocessing
  assert registry.default_preprocessing("cifar_resnet20") == images.Preprocessing(
      crop_size=32, resize_size=32)
  assert registry.default_preprocessing("no_such_model") == images.TORCH


def test_class_lists():
  assert registry.class_names("cifar10") == ["airplane", "automobile", "bird", "cat", "deer",
                                             "dog", "frog", "horse", "ship", "truck"]
  with pytest.raises(WeightsError, match="Unknown class list 'cifar100'; known: cifar10, imagenet1k"):
    registry.class_names("cifar100")
