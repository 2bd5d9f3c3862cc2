"""Helpers for tests/pipelines: subprocess env, config writer, paths of the workflow files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "pipelines" / "Snakefile"
PROFILES = REPO / "pipelines" / "profiles"

#: small but real: tissue background, markers, 4 slides, 2 train / 2 val, pyramidal TIFF
N_SLIDES = 4
SLIDE_PX = 768


def pipeline_env() -> dict[str, str]:
    """Subprocess env: one BLAS thread (2 shared cores), no SLURM/torchrun variables leaking in."""
    drop = (
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", HDF5_USE_FILE_LOCKING="FALSE", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_config(folder: Path, slides: Path, extra: str = "") -> Path:
    """configs/-style YAML: everything relative to ``folder`` (the tests run there)."""
    cfg = folder / "cfg.yaml"
    cfg.write_text(
        f"""slides: {slides}
work: work
tile:
  patch-size: 96
  workers: 1
extract:
  batch-size: 32
  workers: 1
  device: cpu
train:
  run: run
  epochs: 2
  early-stop: none
  device: cpu
  resume: true
predict:
  run: run
  device: cpu
heatmap:
  run: run
{extra}"""
    )
    return cfg
