"""Label maps in the TF Object Detection API text format.

``item { id: 1 name: 'Abyssinian' }`` per class, ids 1-based (0 is the background in the
TF OD API). The Pets label map numbers the breeds in case-insensitive alphabetical order.
"""

from __future__ import annotations

import re
from pathlib import Path

from detkit.core.fsio import atomic_write_bytes

_ITEM = re.compile(r"item\s*\{(?P<body>[^}]*)\}", re.S)
_FIELD = re.compile(r"""(?P<key>\w+)\s*:\s*(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<bare>[^\s}]+))""")


class LabelMapError(ValueError):
    pass


def pets_class_name(image_stem: str) -> str:
    """``Egyptian_Mau_139`` -> ``Egyptian_Mau``: the breed is the file name minus ``_<n>``."""
    name, sep, number = image_stem.rpartition("_")
    if not sep or not name or not number.isdigit():
        raise LabelMapError(f"'{image_stem}': Pets image names are '<Breed_name>_<number>'")
    return name


def pets_label_map(class_names: set[str]) -> dict[int, str]:
    """Ids as in the TF OD API's pet_label_map.pbtxt: case-insensitive alphabetical, from 1."""
    ordered = sorted(class_names, key=lambda n: (n.lower(), n))
    return {i: name for i, name in enumerate(ordered, start=1)}


def format_label_map(label_map: dict[int, str]) -> str:
    return "".join(f"item {{\n  id: {i}\n  name: '{name}'\n}}\n\n" for i, name in sorted(label_map.items()))


def write_label_map(path: Path, label_map: dict[int, str]) -> None:
    atomic_write_bytes(path, format_label_map(label_map).encode())


def read_label_map(path: Path) -> dict[int, str]:
    """Parse ``item { id: N name: '...' }`` blocks; ``display_name`` is accepted and unused."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabelMapError(f"{path}: cannot read label map: {exc}") from exc
    label_map: dict[int, str] = {}
    for number, item in enumerate(_ITEM.finditer(text), start=1):
        fields = {m["key"]: m["sq"] if m["sq"] is not None else m["dq"] if m["dq"] is not None else m["bare"]
                  for m in _FIELD.finditer(item["body"])}
        if "id" not in fields or "name" not in fields:
            raise LabelMapError(f"{path}: item {number} needs both 'id' and 'name'")
        try:
            class_id = int(fields["id"])
        except ValueError:
            raise LabelMapError(f"{path}: item {number}: id '{fields['id']}' is not an integer") from None
        if class_id < 1:
            raise LabelMapError(f"{path}: item {number}: id {class_id} must be >= 1 (0 is the background)")
        if class_id in label_map:
            raise LabelMapError(f"{path}: id {class_id} is used twice")
        label_map[class_id] = fields["name"]
    if not label_map:
        raise LabelMapError(f"{path}: no 'item {{ id: ... name: ... }}' entries found")
    return label_map
