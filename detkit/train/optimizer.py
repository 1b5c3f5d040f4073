"""The optimizer and learning-rate schedule of ``train.*``, and how often the loop stops."""

from __future__ import annotations

import math

import keras


def make_schedule(t):
    """Linear warmup from 0 to ``learning_rate``, then cosine decay (or constant)."""
    alpha = float(t.min_lr_fraction) if t.schedule == "cosine" else 1.0
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if t.warmup_steps else float(t.learning_rate),
        decay_steps=max(int(t.steps) - int(t.warmup_steps), 1),
        alpha=alpha,
        warmup_target=float(t.learning_rate) if t.warmup_steps else None,
        warmup_steps=int(t.warmup_steps),
    )


def make_optimizer(t, schedule):
    clip = {"clipnorm": float(t.clipnorm)} if t.clipnorm is not None else {}
    if t.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=schedule, **clip)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=float(t.weight_decay), **clip)
    return keras.optimizers.SGD(learning_rate=schedule, momentum=float(t.momentum),
                                weight_decay=float(t.weight_decay) or None, **clip)


def stop_interval(t, start: int) -> int:
    """Steps between stops: ``log_every``, or fewer so that every save, eval and the end is a stop."""
    return math.gcd(int(t.log_every), int(t.checkpoint_every), int(t.eval_every), int(t.steps), start)
