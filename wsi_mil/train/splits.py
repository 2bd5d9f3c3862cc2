"""Train/validation splits at slide level. Pure functions of ids, labels, given splits and a seed.

Precedence: ``folds > 1`` (stratified k-fold over all non-test slides; fold ``fold`` is
validation) > a ``split`` column that names validation slides > ``val_frac`` (a stratified
random share of the non-test slides). Slides marked ``test`` never train or validate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsi_mil.errors import ConfigError

TRAIN, VAL, TEST = "train", "val", "test"


def _class_orders(labels: Sequence[int], idx: Sequence[int], seed: int) -> list[list[int]]:
    """Indices of each class (0 then 1), each shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for c in (0, 1):
        members = [i for i in idx if labels[i] == c]
        out.append([members[j] for j in rng.permutation(len(members))])
    return out


def stratified_folds(labels: Sequence[int], folds: int, seed: int = 0) -> list[int]:
    """Fold number (0..folds-1) for each item; each fold gets ~1/folds of every class.

    Classes are dealt round robin, continuing across classes, so fold sizes differ by <= 1.
    """
    if folds < 2:
        raise ConfigError(f"--folds {folds}: k-fold needs at least 2 folds")
    if len(labels) < folds:
        raise ConfigError(
            f"--folds {folds} but only {len(labels)} labelled slides", "use fewer folds"
        )
    fold_of = [0] * len(labels)
    k = 0
    for members in _class_orders(labels, range(len(labels)), seed):
        for i in members:
            fold_of[i] = k % folds
            k += 1
    return fold_of


def stratified_holdout(labels: Sequence[int], frac: float, seed: int = 0) -> list[bool]:
    """True for items drawn into a held-out share ``frac`` of each class (>= 1 left in training)."""
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"--val-frac {frac} is outside [0, 1)")
    held = [False] * len(labels)
    for members in _class_orders(labels, range(len(labels)), seed):
        n = len(members)
        n_val = min(int(round(frac * n)), n - 1) if n else 0
        if frac > 0 and n >= 2:
            n_val = max(n_val, 1)
        for i in members[:n_val]:
            held[i] = True
    return held


def assign_splits(
    slide_ids: Sequence[str],
    labels: Sequence[int],
    given: Sequence[str | None],
    val_frac: float = 0.2,
    folds: int = 0,
    fold: int = 0,
    seed: int = 0,
) -> dict[str, str]:
    """slide_id -> "train" | "val" | "test" for labelled slides (see module doc for the rules)."""
    n = len(slide_ids)
    if not (len(labels) == len(given) == n):
        raise ValueError("slide_ids, labels and given splits must have the same length")
    out: dict[str, str] = {}
    pool = [i for i in range(n) if given[i] != TEST]
    for i in range(n):
        if given[i] == TEST:
            out[slide_ids[i]] = TEST
    if fold and not (folds and folds > 1):
        raise ConfigError(f"--fold {fold} needs --folds K (K > 1) to pick from", "add --folds 5")
    if folds and folds > 1:
        if not 0 <= fold < folds:
            raise ConfigError(f"--fold {fold} is outside 0..{folds - 1}")
        fold_of = stratified_folds([labels[i] for i in pool], folds, seed)
        for j, i in enumerate(pool):
            out[slide_ids[i]] = VAL if fold_of[j] == fold else TRAIN
        return out
    if any(given[i] == VAL for i in pool):
        for i in pool:
            out[slide_ids[i]] = VAL if given[i] == VAL else TRAIN
        return out
    held = stratified_holdout([labels[i] for i in pool], val_frac, seed)
    for j, i in enumerate(pool):
        out[slide_ids[i]] = VAL if held[j] else TRAIN
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation of range(n) from (seed, epoch) only."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    return [int(i) for i in rng.permutation(n)]


def step_groups(order: Sequence[int], group_size: int) -> list[list[int]]:
    """Consecutive groups of ``group_size`` (bags_per_step * world_size); the last may be short."""
    if group_size < 1:
        raise ConfigError(f"bags per step must be >= 1, got {group_size}")
    return [list(order[i : i + group_size]) for i in range(0, len(order), group_size)]
