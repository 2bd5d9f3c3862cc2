"""A per-slide function for run_per_slide tests, at module level so worker processes can
import it (``--processes``)."""

from __future__ import annotations

import os
import time

from wsi_mil.batch import Skip, SlideWarning
from wsi_mil.errors import SlideError


def outcome_by_name(x: str) -> None:
    """Done for any name but: bad (SlideError), boom (ValueError), old (Skip), empty (warning)."""
    if x == "bad":
        raise SlideError("bad.svs: truncated")
    if x == "boom":
        raise ValueError("unexpected")
    if x == "old":
        raise Skip()
    if x == "empty":
        raise SlideWarning("no tissue found")


def dies_on_die(x: str) -> None:
    """Kills its own (worker) process for ``die``, as the out-of-memory killer would; the
    other names take 0.3 s, so the death is seen while they run."""
    if x == "die":
        os._exit(9)
    time.sleep(0.3)


def sleeps(x: str) -> None:
    """Takes ``x`` seconds."""
    time.sleep(float(x))
