"""The contracts in docs/ against the code they describe: every relative link in the repository's
Markdown resolves, nothing points at a document users do not have, and each page names the facts
that the code relies on (keys, variables, settings, signatures), read from the code itself, so a
change to the code that the docs do not follow fails here.

Only the last two tests import TensorFlow (``feature_spec``, the export signature)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from detkit.config import schema
from detkit.core import fsio
from detkit.data import annotations, examples, labelmap, records
from harness.repo_copy import git_files
from sample import make_sample
from tests.test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("dataset", "tfrecords", "pipeline", "training", "models", "export", "serving", "deploy", "testing")
# Spelled with a character class so that this file does not match itself.
OUTSIDE_DOCUMENT = re.compile(r"\bD[E]SIGN\b")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]\n]+\]:\s*(\S+)", re.M)
DOCS_POINTER = re.compile(r"\bdocs/[\w.-]+\.md\b")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def text_files() -> dict[str, str]:
    texts = {}
    for name in git_files():
        try:
            texts[name] = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:  # archives and other binary files
            continue
    return texts


def page(name: str) -> str:
    return (ROOT / "docs" / f"{name}.md").read_text()


def table_row(text: str, key: str) -> str:
    """The table row of a page whose first cell is ``key`` in backticks."""
    rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    assert rows, f"no table row for `{key}`"
    return rows[0]


def missing_mentions(text: str, names) -> list[str]:
    return sorted(name for name in names if f"`{name}`" not in text)


# ---------------------------------------------------------------------------- links


def test_no_file_points_at_a_document_outside_the_repository():
    hits = [f"{name}:{number}: {line.strip()}" for name, text in text_files().items()
            for number, line in enumerate(text.splitlines(), start=1) if OUTSIDE_DOCUMENT.search(line)]
    assert not hits, "cite the docs/ page instead:\n" + "\n".join(hits)


def test_every_relative_markdown_link_resolves_to_a_repository_path():
    files = set(git_files())
    folders = {str(parent) for name in files for parent in Path(name).parents if str(parent) != "."}
    markdown = [name for name in files if name.endswith(".md")]
    assert "README.md" in markdown and all(f"docs/{p}.md" in markdown for p in PAGES)
    broken = []
    for name in markdown:
        text = FENCE.sub("", (ROOT / name).read_text())
        for match in LINK.finditer(text):
            target = (match[1] or match[2]).split("#", 1)[0]
            if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL
                continue
            resolved = (ROOT / name).parent / target
            try:
                rel = str(resolved.resolve().relative_to(ROOT))
            except ValueError:
                broken.append(f"{name}: {target} (outside the repository)")
                continue
            if rel not in files and rel not in folders:
                broken.append(f"{name}: {target}")
    assert not broken, "links to paths the repository does not hold:\n" + "\n".join(broken)


def test_every_docs_page_that_the_code_names_exists():
    named = {(name, pointer) for name, text in text_files().items() for pointer in DOCS_POINTER.findall(text)}
    assert named
    missing = sorted(f"{name}: {pointer}" for name, pointer in named if not (ROOT / pointer).is_file())
    assert not missing, "\n".join(missing)


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index(f"## {title}"):].split("\n## ", 1)[0]


def readme_map() -> list[str]:
    """The paths the README's "Where things live" table names (its first column)."""
    return [path for row in readme_section("Where things live").splitlines() if row.startswith("| `")
            for path in re.findall(r"`([^`]+)`", row.split("|")[1])]


def test_readme_map_names_existing_paths_every_folder_and_every_detkit_subpackage():
    named = readme_map()
    assert [path for path in named if not (ROOT / path).exists()] == []
    top_folders = {name.split("/", 1)[0] for name in git_files() if "/" in name} - {"detkit"}  # by subpackage
    subpackages = {f"detkit/{p.parent.name}" for p in (ROOT / "detkit").glob("*/__init__.py")}
    folders = {path.rstrip("/") for path in named if (ROOT / path).is_dir()}
    assert sorted((top_folders | subpackages) - folders) == [], "folders the map leaves out"
    assert sorted(folders - top_folders - subpackages) == [], "neither a tracked folder nor a detkit subpackage"


def test_readme_map_states_the_import_order_that_the_layers_test_enforces():
    section = readme_section("Where things live")
    assert " -> ".join(LAYERS) in " ".join(section.split())  # Markdown reflows lines
    assert len([row for row in section.splitlines() if row.startswith("| `")]) <= 25  # read at a glance


def test_readme_stays_a_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 400


def test_readme_links_every_contract():
    contracts = readme_section("Contracts")
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    assert sorted(PAGES) == pages
    assert [p for p in pages if f"](docs/{p}.md)" not in contracts] == []


# ---------------------------------------------------------------------------- dataset.md


def test_dataset_page_names_every_sample_quirk_and_image_suffix():
    text = page("dataset")
    quirk_files = [name for names in make_sample.QUIRKS.values() for name in names]
    assert [name for name in quirk_files if f"`{name}" not in text] == []
    assert "`" + "`, `".join(annotations.IMAGE_SUFFIXES) + "`" in text  # in the order they are tried
    assert f"quality {examples.REENCODE_QUALITY}" in text
    label_map = labelmap.pets_label_map({labelmap.pets_class_name(f"{breed}_1") for breed in make_sample.CLASSES})
    flowed = " ".join(text.split())  # Markdown reflows lines
    assert all(f"{i} `{label_map[i]}`" in flowed for i in (1, 2, 3, len(label_map)))
    assert make_sample.LIST_HEADER.count("\n") == 6 and "6 '#' header lines" in text


# ---------------------------------------------------------------------------- tfrecords.md


def written_features() -> dict[str, str]:
    """Key -> list kind (``int64``, ``float``, ``bytes``) of the Example the tfrecord stage writes."""
    record = {"height": 2, "width": 3, "filename": "Abyssinian_1.jpg", "sha256": "0" * 64, "encoded": b"\xff\xd8",
              "text": ["Abyssinian"], "label": [1], "difficult": [0], "truncated": [0], "view": ["Frontal"],
              **{k: [0.5] for k in records.BOX_KEYS}}
    example = records.example_class().FromString(records.encode_example(record))
    return {key: feature.WhichOneof("kind").removesuffix("_list") for key, feature in
            example.features.feature.items()}


def test_tfrecords_page_lists_every_written_key_with_its_type():
    text = page("tfrecords")
    written = written_features()
    wrong = {key: kind for key, kind in written.items() if table_row(text, key).split("|")[2].strip() != kind}
    assert wrong == {}, "list type in the table differs from the written one"
    documented = set(re.findall(r"^\| `(image/[^`]+)` \|", text, re.M))
    assert documented == set(written)


def test_tfrecords_page_shows_shard_names_and_the_label_map_format():
    text = page("tfrecords")
    assert missing_mentions(text, ["<split>-<i>-of-<count>.tfrecord"]) == []
    for split, count in (("train", 10), ("val", 4)):
        names = examples.shard_names(split, count)
        assert names[0] in text and names[-1] in text
    shown = labelmap.format_label_map({1: make_sample.CLASSES[0], 2: make_sample.CLASSES[1]}).strip()
    assert shown in text
    assert f"quality {examples.REENCODE_QUALITY}" in text


# ---------------------------------------------------------------------------- serving.md


def entrypoint_variables() -> dict[str, str | None]:
    """Environment variables serving/entrypoint.sh reads -> their literal default (None if computed).

    A variable is read from the environment where the script expands it with a default
    (``${VAR:-...}``), or expands it without ever assigning it (bash's own variables aside).
    """
    script = (ROOT / "serving" / "entrypoint.sh").read_text()
    code = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in script.splitlines() if not line.startswith("#!"))
    with_default = set(re.findall(r"\$\{([A-Za-z_]\w*):[-?=]", code))
    expanded = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", code))
    assigned = set(re.findall(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=", code, re.M))
    names = with_default | (expanded - assigned - {"BASH_SOURCE"})
    literal = dict(re.findall(r"\$\{([A-Za-z_]\w*):-([^${}]*)\}", code))
    literal.update(re.findall(r"\$\{([A-Za-z_]\w*):-(\$\([a-z]+\))\}", code))  # e.g. $(nproc)
    return {name: literal.get(name) for name in names}


def test_serving_page_names_every_environment_variable_and_its_default():
    text = page("serving")
    variables = entrypoint_variables()
    assert {"MODEL_NAME", "SAGEMAKER_BIND_TO_PORT", "TFS_MAX_BATCH_SIZE", "TMPDIR"} <= set(variables)
    wrong = {name: default for name, default in variables.items()
             if default is not None and f"`{default}`" not in table_row(text, name)}
    assert wrong == {}, "defaults missing from their rows"


def test_serving_page_states_the_image_ports_and_nginx_limits():
    text = page("serving")
    dockerfile = (ROOT / "serving" / "Dockerfile").read_text()
    nginx = (ROOT / "serving" / "nginx.conf.template").read_text()
    version, uid, port = (re.search(pattern, dockerfile, re.M)[1]
                          for pattern in (r"^ARG TF_SERVING_VERSION=(\S+)", r"^USER (\d+)", r"^EXPOSE (\d+)"))
    assert f"tensorflow/serving:{version}" in text
    assert f"uid {uid}" in text and f"`EXPOSE {port}`" in text
    assert re.search(r"^LABEL (\S+)$", dockerfile, re.M)[1] in text
    limits = re.findall(r"^\s*((?:client_max_body_size|proxy_\w+_timeout|client_\w+_timeout) \S+);", nginx, re.M)
    assert len(limits) == 7 and missing_mentions(text, limits) == []
    statuses = re.findall(r"^\s*error_page (\d+)", nginx, re.M)
    assert statuses and [s for s in statuses if not re.search(rf"^\|[^|\n]+\| {s}\b", text, re.M)] == []
    render = (ROOT / "serving" / "render-nginx-conf.sh").read_text()
    substituted = re.findall(r"\$\{(\w+)\}", re.search(r"envsubst '([^']*)'", render)[1])
    assert substituted and [name for name in substituted if f"`${{{name}}}`" not in text] == []


# ---------------------------------------------------------------------------- deploy.md


def test_deploy_page_names_every_setting_environment_and_make_variable():
    text = page("deploy")
    keys = [field.name for field in dataclasses.fields(schema.Deploy)]
    for field in dataclasses.fields(schema.Deploy):
        group = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        nested = dataclasses.fields(group) if dataclasses.is_dataclass(group) else []
        for key in [f"{field.name}.{sub.name}" for sub in nested] or [field.name]:
            table_row(text, key)
    settings = yaml.safe_load((ROOT / "conf" / "deploy" / "sagemaker.yaml").read_text())
    assert set(settings) <= set(keys)
    environment = re.findall(r"\$\{oc\.env:(\w+)", (ROOT / "conf" / "deploy" / "sagemaker.yaml").read_text())
    assert environment and missing_mentions(text, environment) == []
    make_overrides = re.findall(r"\bdeploy\.(\w+)=\$\((\w+)\)", (ROOT / "Makefile").read_text())
    assert len(make_overrides) == 4
    for key, variable in make_overrides:
        assert f"`deploy.{key}=" in text and f"{variable}=" in text


def test_deploy_page_names_the_alarms_and_scaling_that_deploy_creates():
    from detkit.cloud import autoscaling, deploy, guardrails
    from detkit.config import load_config

    text = page("deploy")
    cfg = load_config().deploy
    requests = guardrails.alarm_requests(cfg, deploy.VARIANT)
    named = [*guardrails.alarm_names("<endpoint>"), autoscaling.policy_name("<endpoint>"),
             autoscaling.resource_id("<endpoint>", deploy.VARIANT), autoscaling.DIMENSION, autoscaling.METRIC,
             *{r["Namespace"] for r in requests}, *(r["MetricName"] for r in requests),
             *guardrails.TRAFFIC_TYPES.values()]
    assert missing_mentions(text, named) == []


def test_deploy_page_names_every_make_target_it_documents():
    text = page("deploy")
    makefile = (ROOT / "Makefile").read_text()
    for target in ("deploy", "status", "invoke", "undeploy"):
        assert re.search(rf"^{target}:", makefile, re.M) and f"`make {target}" in text


# ---------------------------------------------------------------------------- TensorFlow


def test_tfrecords_page_lists_every_key_that_feature_spec_parses():
    text = page("tfrecords")
    spec = records.feature_spec()
    assert set(spec) == set(written_features())
    wrong = {}
    for key, feature in spec.items():
        if type(feature).__name__ == "FixedLenFeature":
            assert list(feature.shape) == [], key
            parsed_as = f"`FixedLenFeature([], {feature.dtype.name})`"
        else:
            parsed_as = f"`VarLenFeature({feature.dtype.name})`"
        if parsed_as not in table_row(text, key):
            wrong[key] = parsed_as
    assert wrong == {}, "'parsed as' differs from feature_spec()"


def test_export_page_shows_every_signature_as_saved_model_cli_does():
    from detkit.serve import signatures

    text = page("export")
    default = signatures.expected_signature("M")
    assert f"`{default['method_name']}`" in text
    for kind in ("inputs", "outputs"):
        for name, (dtype, shape) in default[kind].items():
            assert f"| {kind[:-1]} | `{name}` | `{dtype}` | `{shape}` |" in text, (name, dtype, shape)
    for signature in schema.EXTRA_SIGNATURES:
        expected = signatures.expected_signature("M", signature)
        (dtype, shape), = expected["inputs"].values()
        assert f"| `{signature}` | `{dtype}` | `{shape}` |" in text, signature
        # "with the same outputs": the same names and dtypes, the batch size aside.
        batched = {name: (out_dtype, out_shape.replace("(1", "(-1", 1))
                   for name, (out_dtype, out_shape) in expected["outputs"].items()}
        assert batched == {name: tuple(v) for name, v in default["outputs"].items()}, signature
    assert missing_mentions(text, [str(fsio.EXPORT_LABEL_MAP), str(fsio.EXPORT_CHECK)]) == []
