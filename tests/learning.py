"""A tiny model trained on the sample through the real train, eval and export stages, as the learning
tests of each detector family run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detkit.config import load_config


def train_and_evaluate(overrides: list[str], work: Path, records: Path) -> tuple[Any, dict[str, Any]]:
    """The config of ``overrides`` and the eval stage's metrics of the model the train stage made with it."""
    from stages import eval as eval_stage
    from stages import train

    cfg = load_config(overrides=overrides)
    train.run(cfg, {"records": records, "pretrained": work / "pretrained"},
              {"checkpoints": work / "checkpoints", "log": work / "train_log.csv", "val_log": work / "val_log.csv"},
              track=False, bar=False)
    result = eval_stage.run(cfg, {"records": records, "checkpoints": work / "checkpoints"},
                            {"metrics": work / "metrics", "plots": work / "plots"})
    return cfg, result["metrics"]


def export_and_check(cfg, work: Path, records: Path) -> tuple[Any, dict[str, Any]]:
    """The export stage's result for the model ``train_and_evaluate`` left in ``work``, and its export check."""
    from stages import export

    exported = export.run(cfg, {"records": records, "checkpoints": work / "checkpoints"}, {"export": work / "export"})
    return exported, json.loads(next((work / "export").rglob("export_check.json")).read_text())
