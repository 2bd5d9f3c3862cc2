"""`wsi-mil run`: stage planning, in-process stages with one --config, exit-code rules."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import pytest
from pipeline_helpers import pipeline_env

from wsi_mil.errors import ConfigError
from wsi_mil.slides import read_slide_table
from wsi_mil.workflow import (
    features_dir,
    plan_stages,
    resolve_options,
    run_dir,
    single_slide_table,
    synth_up_to_date,
)


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_plan_synth_only_with_section_and_e2e_skips_extract(tmp_path):
    assert plan_stages(_cfg(tmp_path, "slides: s.csv\n")) == [
        "tile",
        "extract",
        "train",
        "predict",
        "heatmap",
    ]
    with_synth = _cfg(tmp_path, "slides: s/slides.csv\nsynth:\n  out: s\ntrain:\n  mode: e2e\n")
    assert plan_stages(with_synth) == ["synth", "tile", "train", "predict", "heatmap"]
    # asked for explicitly: extract runs even for e2e; order is always the pipeline's
    assert plan_stages(with_synth, ["predict", "extract"]) == ["extract", "predict"]
    with pytest.raises(ConfigError, match="bogus"):
        plan_stages(with_synth, ["tile", "bogus"])


def test_options_resolve_like_the_stage_commands(tmp_path):
    cfg = _cfg(tmp_path, "work: W\npatch-size: 64\ntile:\n  patch-size: 32\ntrain:\n  epochs: 3\n")
    tile = resolve_options("tile", cfg)
    assert tile["work"] == "W" and tile["patch_size"] == 32 and tile["min_tissue"] == 0.1
    assert resolve_options("train", cfg)["epochs"] == 3
    # features folder = what extract writes: W/features/<encoder tag>
    d = features_dir(cfg)
    assert d.parent == Path("W/features") and d.name.startswith("resnet-patch-cnn-d128-")
    assert features_dir(cfg, "train") == d  # cached training reads what extract wrote
    other = _cfg(tmp_path, "work: W\nextract:\n  feature-dim: 64\ntrain:\n  feature-dim: 64\n")
    assert features_dir(other) != d and features_dir(other) == features_dir(other, "train")


def test_run_folder_defaults_without_a_run_key(tmp_path):
    """No `run:` key: every stage's run folder is runs/default (heatmap's --run used to be
    required, and resolving it handed click's unset marker to Path)."""
    cfg = _cfg(tmp_path, "slides: s.csv\nwork: W\n")
    for stage in ("train", "predict", "heatmap"):
        assert run_dir(cfg, stage) == Path("runs/default")
    with_run = _cfg(tmp_path, "slides: s.csv\nrun: R\nheatmap:\n  run: H\n")
    assert run_dir(with_run, "predict") == Path("R") and run_dir(with_run, "heatmap") == Path("H")


def test_dry_run_without_a_run_key(cli, tmp_path):
    (tmp_path / "m.yaml").write_text("slides: S/slides.csv\nwork: W\n")
    r = cli("run", "--config", "m.yaml", "--dry-run", cwd=tmp_path, env=pipeline_env())
    assert r.returncode == 0, r.stderr
    assert "runs/default/heatmaps/<slide_id>.png" in r.stdout
    assert "internal error" not in r.stderr


def test_single_slide_table_roundtrip(tmp_path, tiny_slides):
    entries = read_slide_table(tiny_slides)
    e = entries[1]
    p = single_slide_table(e, tmp_path / "t")
    (back,) = read_slide_table(p)
    assert back.slide_id == e.slide_id and back.label == e.label and back.split == e.split
    assert back.path == e.path.resolve()
    mtime = p.stat().st_mtime_ns
    single_slide_table(e, tmp_path / "t")  # unchanged content: file left alone
    assert p.stat().st_mtime_ns == mtime


def test_dry_run_lists_stages_and_outputs(cli, workdir):
    r = cli("run", "--config", "cfg.yaml", "--dry-run", cwd=workdir, env=pipeline_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["tile", "extract", "train", "predict", "heatmap"]
    assert "work/patches/<slide_id>.zarr" in lines[0]
    assert "run/predictions.csv" in lines[3]
    assert not (workdir / "work").exists()  # nothing ran


def test_stops_at_first_stage_exiting_2(cli, workdir):
    cfg = (workdir / "cfg.yaml").read_text()
    (workdir / "cfg.yaml").write_text(cfg.replace("tile:\n", "tile:\n  bogus-option: 1\n"))
    r = cli("-q", "run", "--config", "cfg.yaml", cwd=workdir, env=pipeline_env())
    assert r.returncode == 2
    stages = re.findall(r"^\[run\] (\w+)\s+(.+?)\s{2}", r.stdout, re.M)
    assert stages == [("tile", "STOPPED (error)")], r.stdout
    assert "bogus" in r.stderr and "Traceback" not in r.stderr
    assert not (workdir / "work" / "features").exists()


@pytest.mark.slow
def test_exit_1_continues_and_is_the_final_code(cli, workdir):
    """A corrupt slide fails in tile (exit 1); extract/train/predict still run; run exits 1."""
    table = workdir / "slides" / "slides.csv"
    (workdir / "slides" / "broken.tiff").write_bytes(b"II*\x00not a tiff at all")
    table.write_text(table.read_text() + "broken,broken.tiff,,\n")
    r = cli(
        "-q",
        "run",
        "--config",
        "cfg.yaml",
        "--stages",
        "tile,extract,train,predict",
        cwd=workdir,
        env=pipeline_env(),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    stages = dict(re.findall(r"^\[run\] (\w+)\s+(.+?)\s{2}", r.stdout, re.M))
    assert stages == {
        "tile": "some slides failed",
        "extract": "some slides failed",
        "train": "ok",
        "predict": "some slides failed",
    } or stages == {
        "tile": "some slides failed",
        "extract": "some slides failed",
        "train": "ok",
        "predict": "ok",
    }, r.stdout
    assert (workdir / "run" / "predictions.csv").is_file()
    failures = (workdir / "work" / "failures.csv").read_text()
    assert "broken" in failures and "tile" in failures


def test_synth_is_skipped_when_up_to_date(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # config paths are relative to where the run starts
    cfg = _cfg(
        tmp_path,
        "slides: s/slides.csv\nsynth:\n  out: s\n  n-slides: 2\n  width: 256\n  height: 256\n"
        "  format: png\n  background: noise\n  workers: 1\n",
    )
    assert not synth_up_to_date(cfg)
    r = cli(
        "-q", "run", "--config", "c.yaml", "--stages", "synth", cwd=tmp_path, env=pipeline_env()
    )
    assert r.returncode == 0, r.stderr
    assert synth_up_to_date(cfg)
    mtime = (tmp_path / "s" / "slides.csv").stat().st_mtime_ns
    r = cli(
        "-q", "run", "--config", "c.yaml", "--stages", "synth", cwd=tmp_path, env=pipeline_env()
    )
    assert "synth    up to date" in r.stdout
    assert (tmp_path / "s" / "slides.csv").stat().st_mtime_ns == mtime
    cfg.write_text(cfg.read_text().replace("n-slides: 2", "n-slides: 3"))  # changed option
    assert not synth_up_to_date(cfg)


def test_train_resumes_under_run_unless_the_config_says(tmp_path):
    """Running `wsi-mil run` again must not stop at train ("run folder already holds a
    run"): train gets --resume unless the config chooses resume/overwrite itself."""
    from wsi_mil.workflow import stage_args

    plain = _cfg(tmp_path, "slides: s.csv\nrun: R\n")
    assert stage_args("train", plain)[-1] == "--resume"
    assert "--resume" not in stage_args("predict", plain)
    for text in ("train:\n  resume: false\n", "overwrite: true\n", "train:\n  overwrite: true\n"):
        assert "--resume" not in stage_args("train", _cfg(tmp_path, f"slides: s.csv\n{text}"))
    assert stage_args("train", plain, ["-q"])[:2] == ["-q", "train"]


@pytest.mark.slow
def test_rerun_after_retiling_does_not_keep_the_stale_model(cli, workdir):
    """Only `tile: patch-size` changes: tile and extract rebuild, and train must not then
    find the model trained on the old features "finished" (predict would score the new
    features with it). It stops with exit 2 naming the fix; with `overwrite: true` (the
    config keeps `resume: true`) it retrains, and later runs resume that run again."""
    env = pipeline_env()
    args = ("-q", "run", "--config", "cfg.yaml", "--stages", "tile,extract,train,predict")
    run = workdir / "run"

    def stages(r):
        return dict(re.findall(r"^\[run\] (\w+)\s+(.+?)\s{2}", r.stdout, re.M))

    r = cli(*args, cwd=workdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    best = (run / "checkpoints" / "best.pt").read_bytes()
    cfg = workdir / "cfg.yaml"
    text = cfg.read_text()
    assert "resume: true" in text and "patch-size: 96" in text
    cfg.write_text(text.replace("patch-size: 96", "patch-size: 128"))
    r = cli(*args, cwd=workdir, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert stages(r) == {"tile": "ok", "extract": "ok", "train": "STOPPED (error)"}, r.stdout
    assert "other feature stores" in r.stderr and "overwrite: true" in r.stderr
    assert (run / "checkpoints" / "best.pt").read_bytes() == best

    cfg.write_text(cfg.read_text().replace("train:\n", "train:\n  overwrite: true\n"))
    r = cli(*args, cwd=workdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stages(r)["train"] == "ok" and stages(r)["predict"] == "ok"
    assert (run / "checkpoints" / "best.pt").read_bytes() != best
    with h5py.File(run / "attention" / "synth_000.h5") as f:
        assert f.attrs["patch_size_level0"] == 128

    cfg.write_text(cfg.read_text().replace("  overwrite: true\n", ""))
    best = (run / "checkpoints" / "best.pt").read_bytes()
    r = cli(*args, cwd=workdir, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert stages(r) == {
        "tile": "up to date",
        "extract": "up to date",
        "train": "ok",
        "predict": "up to date",
    }, r.stdout
    assert (run / "checkpoints" / "best.pt").read_bytes() == best


def test_train_resumes_unless_overwrite_true_or_resume_false(tmp_path):
    """The one rule `wsi-mil run`, the Snakefile and train.sbatch share for adding --resume."""
    from wsi_mil.workflow import train_resumes

    for text, want in (
        ("", True),
        ("train:\n  resume: true\n", True),
        ("train:\n  overwrite: false\n", True),
        ("resume: false\n", False),
        ("train:\n  resume: false\n", False),
        ("overwrite: true\n", False),
        ("train:\n  overwrite: true\n  resume: true\n", False),
        ("tile:\n  overwrite: true\n", True),  # another stage's overwrite
    ):
        assert train_resumes(_cfg(tmp_path, f"slides: s.csv\n{text}")) is want, text


def test_stage_params_leave_out_how_a_job_runs(tmp_path):
    """Snakemake's params: an option that can change outputs changes them, workers do not."""
    from wsi_mil.workflow import stage_params

    base = "slides: s.csv\nwork: W\ntile:\n  patch-size: 64\n  workers: 2\n"
    p = stage_params("tile", _cfg(tmp_path, base))
    assert '"patch_size": 64' in p and "workers" not in p and "slides_csv" not in p
    assert stage_params("tile", _cfg(tmp_path, base.replace("workers: 2", "workers: 8"))) == p
    assert stage_params("tile", _cfg(tmp_path, base.replace("64", "48"))) != p
    train = _cfg(tmp_path, "slides: s.csv\ntrain:\n  epochs: 3\n  resume: true\n")
    assert stage_params("train", train, drop=("resume",)) != stage_params("train", train)
    assert '"epochs": 3' in stage_params("train", train)


def test_labels_digest_follows_labels_and_splits(tmp_path):
    """A Snakefile param of train and predict: editing a label or a split reruns them (train
    itself then refuses to resume a run trained on other labels)."""
    from wsi_mil.workflow import labels_digest

    table = tmp_path / "slides.csv"
    table.write_text("slide_id,path,label,split\na,a.tif,0,train\nb,b.tif,1,val\n")
    before = labels_digest(read_slide_table(table))
    table.write_text("slide_id,path,label,split\nb,b.tif,1,val\na,a.tif,0,train\n")
    assert labels_digest(read_slide_table(table)) == before  # row order is no change
    table.write_text("slide_id,path,label,split\na,a.tif,1,train\nb,b.tif,1,val\n")
    assert labels_digest(read_slide_table(table)) != before
    table.write_text("slide_id,path,label,split\na,a.tif,0,val\nb,b.tif,1,val\n")
    assert labels_digest(read_slide_table(table)) != before
