"""Run every stage from one YAML config: ``wsi-mil run`` and the Snakemake workflow.

Both resolve a stage's options exactly as ``wsi-mil <stage> --config FILE`` does (the
command's click defaults, overlaid by the file's top-level keys and its ``<stage>:``
section), so a pipeline run and the stage commands run by hand produce the same files.

``run_pipeline`` invokes the stages' click commands in-process, in order, each with the
same ``--config FILE``; it stops at the first stage that exits 2 (usage/config error),
keeps going past a stage that exits 1 (some slides failed) and then returns 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from wsi_mil.config import load_config_file, load_full_config
from wsi_mil.errors import OUTPUT_PATHS, ConfigError, WsiMilError, output_hint, path_error

log = logging.getLogger(__name__)

STAGES = ("synth", "tile", "extract", "train", "predict", "heatmap")


# ---------------------------------------------------------------- option resolution
def stage_command(stage: str) -> click.Command:
    """The click command of ``wsi-mil <stage>``."""
    from wsi_mil.cli import cli

    cmd = cli.commands.get(stage)
    if cmd is None:
        raise ConfigError(f"unknown stage {stage!r}", f"stages: {', '.join(STAGES)}")
    return cmd


#: the default click >= 8.2 gives options that have none (older click: None)
try:
    from click._utils import UNSET as _CLICK_UNSET
except ImportError:  # pragma: no cover - click < 8.2
    _CLICK_UNSET = None


def resolve_options(stage: str, config_path: str | os.PathLike) -> dict[str, Any]:
    """Option values ``wsi-mil <stage> --config FILE`` would run with, by click parameter name.

    Click defaults (None for options without one), overlaid by the config file (top-level
    keys, then the stage's section). Values are as written in the YAML (not type-converted
    beyond what YAML does).
    """
    from wsi_mil.cli.common import _option_names

    cmd = stage_command(stage)
    out: dict[str, Any] = {}
    for p in cmd.params:
        if p.name and p.name != "config":
            d = p.default() if callable(p.default) else p.default
            out[p.name] = None if d is _CLICK_UNSET else d
    names = _option_names(cmd)
    for k, v in load_config_file(config_path, stage).items():
        if k in names and names[k] != "config":
            out[names[k]] = v
    return out


def _dataclass_from(cls: type, opts: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in opts.items() if k in fields and v is not None}
    for k in ("work", "run", "features", "patches", "weights", "out"):
        if k in kw and isinstance(kw[k], str):
            kw[k] = Path(kw[k])
    return cls(**kw)


def slides_csv(config_path: str | os.PathLike, stage: str = "tile") -> Path | None:
    """The slide table a stage reads (``slides:`` key), or None."""
    v = load_config_file(config_path, stage).get("slides")
    return Path(v) if v else None


def train_mode(config_path: str | os.PathLike) -> str:
    return str(resolve_options("train", config_path).get("mode") or "cached")


def features_dir(config_path: str | os.PathLike, stage: str = "extract") -> Path:
    """Folder of ``<slide_id>.h5`` that ``extract`` writes (``--features`` or W/features/<tag>)."""
    from wsi_mil.config import ExtractConfig, TrainConfig
    from wsi_mil.features import default_features_dir

    opts = resolve_options(stage, config_path)
    if opts.get("features"):
        return Path(opts["features"])
    # train/predict read what extract wrote with its defaults (default_features_dir knows)
    cfg = _dataclass_from(ExtractConfig if stage == "extract" else TrainConfig, opts)
    return default_features_dir(Path(opts.get("work") or "work"), cfg)


def patches_dir(config_path: str | os.PathLike) -> Path:
    """Folder of ``<slide_id>.zarr`` patch stores (``W/patches``)."""
    opts = resolve_options("tile", config_path)
    return Path(opts.get("work") or "work") / "patches"


def run_dir(config_path: str | os.PathLike, stage: str = "train") -> Path:
    """The run folder a stage uses (``run:``), else ``runs/default``, the commands' default."""
    return Path(resolve_options(stage, config_path).get("run") or "runs/default")


#: options that say how a stage runs, not what it writes (the Snakefile gives per-slide jobs
#: their own --slides/--shard/--workers): left out of :func:`stage_params`
RUN_CONTROL_OPTIONS = frozenset(
    {"config", "debug", "quiet", "verbose", "workers", "processes", "shard", "slides_csv"}
    | {"slide_paths", "slides"}
    # what the stage commands also leave current outputs alone for: a device or batch size
    # gives the same outputs, compression the same pixels, and overwrite is for one run
    # (under Snakemake: --forcerun RULE); as params, each edit would delete every output
    | {"overwrite", "device", "batch_size", "compression"}
)


def stage_params(stage: str, config_path: str | os.PathLike, drop: Sequence[str] = ()) -> str:
    """A stage's resolved options (but :data:`RUN_CONTROL_OPTIONS` and ``drop``) as one
    canonical string: the Snakefile's rule params, so that Snakemake's ``params`` rerun
    trigger reruns a stage's jobs when an option that can change its outputs is edited."""
    import json

    opts = resolve_options(stage, config_path)
    keep = {k: v for k, v in opts.items() if k not in RUN_CONTROL_OPTIONS and k not in drop}
    return json.dumps(keep, sort_keys=True, default=str)


def labels_digest(entries: Sequence[Any]) -> str:
    """Digest of the (slide_id, label, split) rows of slide-table ``entries``: a Snakefile
    param, so that editing a label or a split reruns the jobs that use them."""
    import hashlib
    import json

    rows = sorted(
        [e.slide_id, None if e.label is None else int(e.label), e.split or ""] for e in entries
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def single_slide_table(entry: Any, folder: str | os.PathLike) -> Path:
    """Write (if changed) ``folder/<slide_id>.csv``: a one-row slide table with an absolute path.

    Lets a per-slide job run ``wsi-mil <stage> --slides`` on exactly one slide while keeping
    the slide_id, label and split of the full table.
    """
    import csv
    import io

    from wsi_mil.batch import atomic_path

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "path", "label", "split"])
    path = "" if entry.path is None else str(Path(entry.path).resolve())
    label = "" if entry.label is None else int(entry.label)
    w.writerow([entry.slide_id, path, label, entry.split or ""])
    out = Path(folder) / f"{entry.slide_id}.csv"
    text = buf.getvalue()
    if not out.is_file() or out.read_text() != text:
        with atomic_path(out) as tmp:
            tmp.write_text(text)
    return out


def stage_output(stage: str, config_path: str | os.PathLike) -> str:
    """Where a stage's outputs are, for the one-line summary."""
    try:
        if stage == "synth":
            return str(resolve_options("synth", config_path).get("out"))
        if stage == "tile":
            return f"{patches_dir(config_path)}/<slide_id>.zarr"
        if stage == "extract":
            return f"{features_dir(config_path)}/<slide_id>.h5"
        if stage == "train":
            return f"{run_dir(config_path, 'train')}/ (checkpoints/, metrics.csv)"
        if stage == "predict":
            r = run_dir(config_path, "predict")
            return f"{r}/predictions.csv, {r}/metrics.json, {r}/attention/"
        if stage == "heatmap":
            return f"{run_dir(config_path, 'heatmap')}/heatmaps/<slide_id>.png"
    except WsiMilError as e:
        return f"(unknown: {e})"
    return ""


def synth_up_to_date(config_path: str | os.PathLike) -> bool:
    """True if ``synth``'s outputs exist and were made with the options the config gives now.

    Regenerating would give the same pixels but new file times, which would make every
    later stage redo its work; ``wsi-mil run`` therefore skips an up-to-date synth.
    """
    import yaml

    from wsi_mil.config import SynthConfig, to_plain
    from wsi_mil.slides import read_slide_table

    try:
        from wsi_mil.synth import resolve_config
    except ImportError:
        return False
    opts = resolve_options("synth", config_path)
    if not opts.get("out"):
        return False
    out = Path(opts["out"])
    if not (out / "slides.csv").is_file() or not (out / "synth.yaml").is_file():
        return False
    if opts.get("zarr_format") is not None:
        opts["zarr_format"] = int(opts["zarr_format"])
    try:
        fields = {f.name for f in dataclasses.fields(SynthConfig)}
        want = to_plain(
            resolve_config(SynthConfig(**{k: v for k, v in opts.items() if k in fields}))
        )
        have = yaml.safe_load((out / "synth.yaml").read_text())
        entries = read_slide_table(out / "slides.csv")
    except Exception:  # noqa: BLE001 - anything odd: regenerate
        return False
    return want == have and all(e.path is not None and e.path.exists() for e in entries)


# ---------------------------------------------------------------- planning
def plan_stages(config_path: str | os.PathLike, stages: Sequence[str] | None = None) -> list[str]:
    """Stages to run, in pipeline order.

    Default: ``synth`` only if the config has a ``synth:`` section; ``extract`` skipped when
    the training mode is ``e2e``; every other stage. ``stages`` given explicitly wins (extract
    then runs even for e2e).
    """
    full = load_full_config(config_path)
    if not isinstance(full, dict):
        raise ConfigError(f"config file {config_path} must be a mapping")
    if stages:
        wanted = [s.strip() for s in stages if s.strip()]
        bad = [s for s in wanted if s not in STAGES]
        if bad:
            raise ConfigError(
                f"unknown stage(s) {', '.join(bad)}", f"choose from {', '.join(STAGES)}"
            )
        return [s for s in STAGES if s in wanted]
    plan = []
    for s in STAGES:
        if s == "synth" and not isinstance(full.get("synth"), dict):
            continue
        if s == "extract" and train_mode(config_path) == "e2e":
            continue
        plan.append(s)
    return plan


# ---------------------------------------------------------------- running
#: width of the status column of ``wsi-mil run``'s stage lines (the longest status)
STATUS_WIDTH = len("some slides failed")


@dataclass
class StageRun:
    """Outcome of one stage of ``wsi-mil run``."""

    stage: str
    exit_code: int
    seconds: float | None  # None: not run (synth found its slides current)
    outputs: str
    up_to_date: bool = False  # a per-slide stage that found every output current

    def line(self) -> str:
        status = {0: "ok", 1: "some slides failed", 2: "STOPPED (error)", 3: "CRASHED"}
        s = status.get(self.exit_code, f"failed (exit {self.exit_code})")
        if self.exit_code == 0 and self.up_to_date:
            s = "up to date"
        took = " " * 9 if self.seconds is None else f"{self.seconds:7.1f} s"
        return f"[run] {self.stage:<8} {s:<{STATUS_WIDTH}}  {took}  -> {self.outputs}"


def stage_args(
    stage: str, config_path: str | os.PathLike, global_args: Sequence[str] = ()
) -> list[str]:
    """``wsi-mil`` arguments of one stage of ``wsi-mil run``: ``[GLOBAL] <stage> --config FILE``.

    ``train`` gets ``--resume`` (:func:`train_resumes`) unless the config's train options
    set ``overwrite: true`` or ``resume: false``:
    running ``wsi-mil run`` again continues (or finds finished) its run, as every other
    stage skips what is current, instead of refusing because the run folder is taken.
    A run whose inputs changed since (other slides, feature or patch stores, training
    options, fewer epochs than it has trained) is not continued: train exits 2 naming the
    fix (``train: overwrite: true`` for one run, which wins over ``resume``, or another
    ``run:``), since retraining by itself would throw away a model without being asked.
    """
    args = [*global_args, stage, "--config", str(config_path)]
    if stage == "train" and train_resumes(config_path):
        args.append("--resume")
    return args


def train_resumes(config_path: str | os.PathLike) -> bool:
    """Whether ``wsi-mil run`` and the Snakefile add ``--resume`` to ``train``: yes unless the
    config's train options set ``overwrite: true`` (start afresh, for one run: a typed
    ``--resume`` would beat it) or ``resume: false``."""
    opts = load_config_file(config_path, "train")
    return not (opts.get("overwrite") or ("resume" in opts and not opts["resume"]))


def invoke_stage(
    stage: str, config_path: str | os.PathLike, global_args: Sequence[str] = ()
) -> int:
    """Run ``wsi-mil [GLOBAL] <stage> --config FILE`` in this process; return its exit code.

    Errors are reported exactly as the console script reports them (one line on stderr).
    """
    import traceback

    from wsi_mil.cli import cli

    args = stage_args(stage, config_path, global_args)
    debug = "--debug" in global_args
    try:
        rv = cli.main(args=args, prog_name="wsi-mil", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        click.echo(str(code), err=True)
        return 1
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except WsiMilError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - report like the console script, then stop the run
        if debug:
            traceback.print_exc()
        err = path_error(e, output_hint(OUTPUT_PATHS.get(stage)))
        if err is not None:  # an output folder that cannot be made or written: bad input
            click.echo(f"error: {err}", err=True)
            return err.exit_code
        click.echo(
            f"internal error in '{stage}': {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            err=True,
        )
        return 3


def run_pipeline(
    config_path: str | os.PathLike,
    stages: Sequence[str] | None = None,
    global_args: Sequence[str] = (),
    echo: Callable[[str], None] = click.echo,
) -> tuple[int, list[StageRun]]:
    """Run the planned stages in order with the same ``--config``; returns (exit code, runs).

    Exit code: 0 all stages clean; 1 some stage had failed slides (or crashed); 2 a stage
    stopped the run with a usage/configuration error.
    """
    from wsi_mil.cli.common import take_last_batch

    config_path = Path(config_path)
    plan = plan_stages(config_path, stages)
    echo(f"[run] {config_path}: {' -> '.join(plan)}")
    runs: list[StageRun] = []
    final = 0
    for stage in plan:
        if stage == "synth" and synth_up_to_date(config_path):
            echo(StageRun("synth", 0, None, stage_output("synth", config_path), True).line())
            continue
        take_last_batch()  # clear the previous stage's
        t0 = time.perf_counter()
        code = invoke_stage(stage, config_path, global_args)
        sys.stderr.flush()
        batch = take_last_batch()
        current = bool(batch and batch.skipped and not (batch.done or batch.failed or batch.busy))
        r = StageRun(
            stage, code, time.perf_counter() - t0, stage_output(stage, config_path), current
        )
        runs.append(r)
        echo(r.line())
        if code == 2:
            return 2, runs
        if code != 0:
            final = 1
            if code != 1:  # crashed: later stages would only fail on missing inputs
                echo(f"[run] stopping: '{stage}' crashed")
                return 1, runs
    return final, runs
