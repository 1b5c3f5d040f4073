"""The train loop's progress lines: each format is defined once here, and the parser that reads
them back (the SageMaker job watcher, from the job's CloudWatch logs; SageMaker's own metric
regexes) is derived from the format, so the two cannot drift apart."""

from __future__ import annotations

import re
import string

NUMBER = r"[-+0-9.eE]+|nan|inf"  # what a formatted int or float prints as

# One line per stop of a run that draws no bar (inside a SageMaker job).
STEP = "train: step {step}/{steps}: loss {loss:.4f}, lr {learning_rate:.3e}"
# One line per evaluation during training.
VALIDATION = "train: step {step}: val AP {AP:.3f}  AP50 {AP50:.3f}"


def pattern(fmt: str, capture: str | None = None) -> str:
    """A regex for the lines ``fmt`` prints: named groups per field, or only ``capture`` as the one group."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(fmt):
        parts.append(re.escape(literal))
        if name is not None:
            if capture is None:
                parts.append(f"(?P<{name}>{NUMBER})")
            else:
                parts.append(f"({NUMBER})" if name == capture else f"(?:{NUMBER})")
    return "".join(parts)


STEP_RE, VALIDATION_RE = re.compile(pattern(STEP)), re.compile(pattern(VALIDATION))


def parse(line: str) -> dict[str, float] | None:
    """The fields of a ``STEP`` or ``VALIDATION`` line (``step`` and ``steps`` as int), else None."""
    match = STEP_RE.fullmatch(line.strip()) or VALIDATION_RE.fullmatch(line.strip())
    if match is None:
        return None
    return {k: int(v) if k in ("step", "steps") else float(v) for k, v in match.groupdict().items()}
