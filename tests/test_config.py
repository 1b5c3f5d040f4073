"""Config is composed from params.yaml + conf/ groups and validated before any work."""

from __future__ import annotations

import shutil

import pytest

from detkit.config import ConfigError, load_config
from tests.conftest import REPO_ROOT


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """params.yaml and conf/ in a scratch root, so a test can break them freely."""
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(REPO_ROOT / "conf", tmp_path / "conf")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def test_real_config_composes_every_group_file():
    for path in sorted((REPO_ROOT / "conf" / "dataset").glob("*.yaml")):
        if path.stem == "voc_custom":
            continue  # needs local_dir, tested below
        cfg = load_config(overrides=[f"dataset={path.stem}"])
        assert cfg.dataset.name == path.stem
        assert cfg.dataset.archives, path


def test_params_defaults_are_the_real_run():
    cfg = load_config()
    assert cfg.dataset.name == "oxford_pets"
    assert [a.name for a in cfg.dataset.archives] == ["images", "annotations"]


def test_typo_in_params_key_names_key_and_closest(repo_copy):
    text = (repo_copy / "params.yaml").read_text().replace("  seed:", "  sed:")
    (repo_copy / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'split.sed' \(did you mean 'seed'\?\)"):
        load_config()


def test_typo_in_top_level_section(repo_copy):
    with pytest.raises(ConfigError, match=r"unknown key 'tfrecords' \(did you mean 'tfrecord'\?\)"):
        load_config(overrides=["tfrecords.train_shards=3"])


def test_unknown_group_file_names_file_and_closest():
    expected = r"dataset=sampel: no such config file .*sampel.yaml \(did you mean 'sample'\?\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides=["dataset=sampel"])


def test_typo_inside_group_file_names_that_file(repo_copy):
    path = repo_copy / "conf" / "dataset" / "sample.yaml"
    path.write_text(path.read_text().replace("layout:", "layuot:"))
    with pytest.raises(ConfigError, match=r"sample.yaml: unknown key 'layuot' \(did you mean 'layout'\?\)"):
        load_config(overrides=["dataset=sample"])


def test_typo_inside_list_of_archives(repo_copy):
    path = repo_copy / "conf" / "dataset" / "sample.yaml"
    path.write_text(path.read_text().replace("sha256:", "sha265:", 1))
    with pytest.raises(ConfigError, match=r"unknown key 'archives\[0\].sha265' \(did you mean 'sha256'\?\)"):
        load_config(overrides=["dataset=sample"])


def test_required_value_left_unset_is_named():
    with pytest.raises(ConfigError, match=r"not set \(marked \?\?\?\): dataset.local_dir"):
        load_config(overrides=["dataset=voc_custom"])


def test_wrong_type_is_refused_with_key():
    with pytest.raises(ConfigError, match="split.seed"):
        load_config(overrides=["split.seed=abc"])


@pytest.mark.parametrize("override, message", [
    ("split.train_fraction=1.5", "split.train_fraction"),
    ("tfrecord.val_shards=0", "tfrecord.val_shards"),
    ("dataset.max_extracted_bytes=0", "dataset.max_extracted_bytes: 0 must be at least 1"),
    ("export.max_image_pixels=0", "export.max_image_pixels: 0 must be at least 1"),
    ("export.max_jpeg_scans=0", "export.max_jpeg_scans: 0 must be at least 1"),
    ("deploy.rollout.step_percent=60", "rollout.step_percent 60 must be in \\[1, 50\\] for canary"),
    ("deploy.image=docker", "deploy.image"),
    ("deploy.instance_type=ml.x9.huge", "instance_type ml.x9.huge is not in deploy.instances"),
    ("deploy.autoscaling.max_instances=0", "1 <= min_instances <= max_instances"),
    ("deploy.transform.max_concurrent_transforms=20", "max_concurrent_transforms x transform.max_payload_mb"),
    ("model.serving_gib.per_image=0", "serving_gib.base and serving_gib.per_image must be positive"),
])
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["dataset=sample", override])


def test_command_line_prints_one_value_or_names_the_closest_key(capsys):
    from detkit.config.show import main

    assert main(["export.model_name"]) == 0
    assert capsys.readouterr().out.strip() == "pet_object_detection"
    assert main(["export.modl_name"]) == 2
    assert "no config key 'export.modl_name' (did you mean 'model_name'?)" in capsys.readouterr().err


def schema_defaults(cls, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default value, for every field of the dataclass ``cls`` (and those it nests)
    that has one other than ``???``."""
    import dataclasses

    from omegaconf import MISSING

    found = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found.update(schema_defaults(f.default_factory, f"{key}."))
        elif f.default is not dataclasses.MISSING and f.default is not MISSING:
            found[key] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            found[key] = f.default_factory()
    return found


def file_keys(node, prefix: str = "") -> set[str]:
    """Every dotted key a YAML mapping sets."""
    keys = set()
    for key, value in node.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= file_keys(value, f"{prefix}{key}.")
    return keys


def every_schema():
    from detkit.config import schema

    yield "", schema.Config
    for group, schemas in (("model", schema.MODEL_SCHEMAS), ("compute", schema.COMPUTE_SCHEMAS)):
        for cls in schemas.values():
            yield f"{group}.", cls


def test_values_live_in_the_files_and_nowhere_else():
    """The schema holds types and checks; a default there would be a second place for a value (or a
    value no file shows): every key is required (``???``) and set by params.yaml or a group file."""
    import yaml

    set_in_files = file_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    for path in (REPO_ROOT / "conf").glob("*/*.yaml"):
        set_in_files |= file_keys(yaml.safe_load(path.read_text()) or {}, f"{path.parent.name}.")
    for prefix, cls in every_schema():
        defaults = schema_defaults(cls, prefix)
        assert not defaults, (f"{cls.__name__}: values belong in params.yaml or conf/, not the schema: "
                              f"{defaults} (set in a file: {sorted(set(defaults) & set_in_files)})")


def test_a_default_in_the_schema_is_found():
    import dataclasses

    from omegaconf import MISSING

    @dataclasses.dataclass
    class Inner:
        steps: int = 20000
        seed: int = MISSING

    @dataclasses.dataclass
    class Outer:
        train: Inner = dataclasses.field(default_factory=Inner)
        shards: list[int] = dataclasses.field(default_factory=lambda: [4, 2])

    assert schema_defaults(Outer) == {"train.steps": 20000, "shards": [4, 2]}
