"""stages.pretrained: starting weights from a preset archive served on 127.0.0.1, a local
preset folder, or none; the result is a local KerasHub preset that loads back identically."""

from __future__ import annotations

import hashlib
import json
import tarfile

import keras_hub
import numpy as np
import pytest
from omegaconf import OmegaConf

from detkit.config import ConfigError, load_config
from detkit.data.archive import ArchiveError
from detkit.models import family
from harness.httpserver import FileServer
from stages import pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    """A small RetinaNet saved as a KerasHub preset, and a .tar.gz of it."""
    root = tmp_path_factory.mktemp("preset")
    cfg = load_config(overrides=["model=retinanet_tiny"])
    detector = family.build(cfg.model, 3, None).model
    detector.save_to_preset(str(root / "tiny_preset"))
    with tarfile.open(root / "tiny_preset.tar.gz", "w:gz") as tar:
        tar.add(root / "tiny_preset", arcname="tiny_preset")
    return detector, root


def config_with(source, sha256=None):
    cfg = load_config(overrides=["model=retinanet_tiny"])
    return OmegaConf.merge(cfg, {"model": {"pretrained": source, "pretrained_sha256": sha256}})


def same_weights(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def test_archive_served_over_http_becomes_a_loadable_preset(tiny_preset, tmp_path):
    detector, root = tiny_preset
    digest = hashlib.sha256((root / "tiny_preset.tar.gz").read_bytes()).hexdigest()
    with FileServer(root) as server:
        cfg = config_with(server.url("tiny_preset.tar.gz"), digest)
        summary = pretrained.run(cfg, {"cache": tmp_path / "cache"}, {"pretrained": tmp_path / "out"})
    assert summary["kind"] == "archive" and summary["sha256"] == digest
    assert json.loads((tmp_path / "out" / "source.json").read_text())["source"].startswith("http://127.0.0.1")
    assert same_weights(detector, keras_hub.models.RetinaNetObjectDetector.from_preset(str(tmp_path / "out")))


def test_wrong_checksum_leaves_no_output(tiny_preset, tmp_path):
    _, root = tiny_preset
    with FileServer(root) as server:
        cfg = config_with(server.url("tiny_preset.tar.gz"), "0" * 64)
        with pytest.raises(ArchiveError, match="sha256"):
            pretrained.run(cfg, {"cache": tmp_path / "cache"}, {"pretrained": tmp_path / "out"})
    assert not (tmp_path / "out").exists()


def test_archive_without_checksum_is_refused_before_download(tmp_path):
    with pytest.raises(ConfigError, match="pretrained_sha256 is required"):
        pretrained.run(config_with("http://127.0.0.1:9/x.tar.gz"), {"cache": tmp_path}, {"pretrained": tmp_path / "o"})


def test_local_preset_folder_and_none(tiny_preset, tmp_path):
    detector, root = tiny_preset
    cfg = config_with(str(root / "tiny_preset"))
    summary = pretrained.run(cfg, {"cache": tmp_path}, {"pretrained": tmp_path / "a"})
    assert summary["kind"] == "hub" and summary["class"] == "RetinaNetObjectDetector"
    assert same_weights(detector, keras_hub.models.RetinaNetObjectDetector.from_preset(str(tmp_path / "a")))

    summary = pretrained.run(config_with("none"), {"cache": tmp_path}, {"pretrained": tmp_path / "b"})
    assert summary["kind"] == "none"
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["source.json"]


def test_unknown_source_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained: 'no/such/folder'"):
        pretrained.run(config_with("no/such/folder"), {"cache": tmp_path}, {"pretrained": tmp_path / "o"})
