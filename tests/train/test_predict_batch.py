"""`wsi-mil predict` as a per-slide stage (DESIGN.md): skips current slides, --shard I/N,
a bad slide is recorded and the others finish; real HDF5 stores, real CLI subprocesses."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from bag_factory import make_bags, write_bags, write_table

from wsi_mil.config import PredictConfig, TrainConfig
from wsi_mil.slides.table import read_slide_table
from wsi_mil.train import train
from wsi_mil.train.predict import predict_slides

ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cached run on 12 small bags (trained once for the module)."""
    d = tmp_path_factory.mktemp("predict")
    bags = make_bags(12, dim=8, n_min=10, n_max=20)
    write_bags(bags, d / "feats")
    table = write_table(bags, d / "slides.csv")
    cfg = TrainConfig(
        work=d / "w", run=d / "run", features=d / "feats", epochs=1, device="cpu", val_frac=0.0
    )
    train(cfg, read_slide_table(table), progress=False)
    return d, table


def _fresh(trained, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the run (checkpoints + config) and of the feature stores."""
    import shutil

    d, table = trained
    shutil.copytree(d / "run", tmp_path / "run")
    shutil.copytree(d / "feats", tmp_path / "feats")
    rows = list(csv.DictReader(open(table)))
    for r in rows:
        r["path"] = ""
    with open(tmp_path / "slides.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp_path / "run", tmp_path / "feats", tmp_path / "slides.csv"


def _cfg(tmp_path, run, feats, **kw):
    return PredictConfig(work=tmp_path / "w", run=run, features=feats, device="cpu", **kw)


def _mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "attention").glob("*.h5")}


def test_rerun_skips_current_slides_and_rescores_changed_ones(trained, tmp_path):
    run, feats, table = _fresh(trained, tmp_path)
    entries = read_slide_table(table)
    first = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert len(first.batch.done) == 12 and not first.batch.skipped
    preds1 = (run / "predictions.csv").read_text()
    times = _mtimes(run)

    again = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert len(again.batch.skipped) == 12 and not again.batch.done
    assert (run / "predictions.csv").read_text() == preds1  # probabilities read back
    assert _mtimes(run) == times and again.metrics == first.metrics

    # one feature store rewritten (new values): only that slide is scored again
    with h5py.File(feats / "bag003.h5", "r+") as f:
        f["features"][...] = f["features"][...] + 1.0
    third = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert third.batch.done == ["bag003"] and len(third.batch.skipped) == 11
    new = pd.read_csv(run / "predictions.csv").set_index("slide_id")["prob"]
    old = pd.read_csv(pd.io.common.StringIO(preds1)).set_index("slide_id")["prob"]
    assert new.drop("bag003").equals(old.drop("bag003")) and new["bag003"] != old["bag003"]

    # --overwrite scores everything again
    assert (
        len(
            predict_slides(
                _cfg(tmp_path, run, feats, overwrite=True), entries, progress=False
            ).batch.done
        )
        == 12
    )


def test_a_bad_slide_is_recorded_and_the_others_finish(trained, tmp_path, cli):
    """The first slide (the one the up-front folder check looks at) has non-finite features
    and another store is truncated: both are recorded, the other 10 are scored."""
    run, feats, table = _fresh(trained, tmp_path)
    with h5py.File(feats / "bag000.h5", "r+") as f:
        f["features"][0, 0] = np.nan
    data = (feats / "bag005.h5").read_bytes()
    (feats / "bag005.h5").write_bytes(data[: len(data) // 3])
    r = cli("-q", "predict", "--slides", str(table), "--work", str(tmp_path / "w"), "--run", str(run),
            "--features", str(feats), "--device", "cpu", env=ENV)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "FAILED bag000" in r.stderr and "FAILED bag005" in r.stderr
    preds = pd.read_csv(run / "predictions.csv")
    assert len(preds) == 10 and not {"bag000", "bag005"} & set(preds.slide_id)
    fails = pd.read_csv(tmp_path / "w" / "failures.csv")
    assert sorted(fails.slide_id) == ["bag000", "bag005"] and (fails.stage == "predict").all()


def test_shards_then_one_collecting_call_equal_one_unsharded_run(trained, tmp_path, cli):
    run, feats, table = _fresh(trained, tmp_path)
    args = ("-q", "predict", "--slides", str(table), "--work", str(tmp_path / "w"), "--run", str(run),
            "--features", str(feats), "--device", "cpu")  # fmt: skip
    for i in (0, 1):
        r = cli(*args, "--shard", f"{i}/2", env=ENV)
        assert r.returncode == 0, r.stderr
    assert len(list((run / "attention").glob("*.h5"))) == 12
    assert not (run / "predictions.csv").exists()  # shards write only their slides' files
    times = _mtimes(run)
    r = cli(*args, env=ENV)  # collects: nothing scored again
    assert r.returncode == 0, r.stderr
    assert "0 done, 12 up to date" in r.stderr and _mtimes(run) == times
    collected = pd.read_csv(run / "predictions.csv").sort_values("slide_id")

    run2, feats2, table2 = _fresh(trained, tmp_path / "b")
    entries = read_slide_table(table2)
    predict_slides(_cfg(tmp_path / "b", run2, feats2), entries, progress=False)
    direct = pd.read_csv(run2 / "predictions.csv").sort_values("slide_id")
    assert collected.reset_index(drop=True).equals(direct.reset_index(drop=True))

    r = cli(*args, "--shard", "0/2", "--no-attention", env=ENV)
    assert r.returncode == 2 and "--no-attention" in r.stderr and "Traceback" not in r.stderr


def test_attention_file_records_an_absolute_slide_path(trained, tmp_path, cli):
    run, feats, table = _fresh(trained, tmp_path)
    rows = list(csv.DictReader(open(table)))
    rows[0]["path"] = "slides/x.tiff"  # relative to the table's folder
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = cli("-q", "predict", "--slides", "slides.csv", "--work", "w", "--run", "run",
            "--features", "feats", "--device", "cpu", cwd=tmp_path, env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr
    with h5py.File(run / "attention" / f"{rows[0]['slide_id']}.h5") as f:
        assert f.attrs["slide_path"] == str(tmp_path.resolve() / "slides" / "x.tiff")


def test_out_keeps_the_runs_own_evaluation(trained, tmp_path, cli):
    """--out-dir OUT: an external cohort's predictions go to OUT (heatmap --run OUT reads
    them); the run folder's predictions.csv and attention files are left as they were."""
    run, feats, table = _fresh(trained, tmp_path)
    args = ("-q", "predict", "--slides", str(table), "--work", str(tmp_path / "w"), "--run", str(run),
            "--features", str(feats), "--device", "cpu")  # fmt: skip
    assert cli(*args, env=ENV).returncode == 0
    own = (run / "predictions.csv").read_text()
    times = _mtimes(run)
    rows = list(csv.DictReader(open(table)))[:4]
    ext = tmp_path / "external.csv"
    with open(ext, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "label": ""} for r in rows)  # unlabelled
    out = tmp_path / "ext-preds"
    r = cli(*args[1:3], str(ext), *args[4:], "--out-dir", str(out), env=ENV)
    assert r.returncode == 0, r.stderr
    assert "4 slides share their id with the run's train/val slides" in r.stderr
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(preds) == 4
    # same slide ids as the run's own slides, but another cohort: not the run's splits
    assert set(preds.split) == {""}, preds
    assert len(list((out / "attention").glob("*.h5"))) == 4
    assert (run / "predictions.csv").read_text() == own and _mtimes(run) == times
    r = cli("-q", "heatmap", "--run", str(out), "--top-k", "0", env=ENV)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "heatmaps").glob("*.png"))) == 4


def test_a_shard_whose_slides_have_no_store_warns_like_an_unsharded_call(trained, tmp_path, cli):
    """Whether a shard stops must not depend on how slide ids fall into shards."""
    run, feats, table = _fresh(trained, tmp_path)
    for sid in ("bag000", "bag006"):  # shard 0 of 6 holds exactly these two
        (feats / f"{sid}.h5").unlink()
    args = ("predict", "--slides", str(table), "--work", str(tmp_path / "w"), "--run", str(run),
            "--features", str(feats), "--device", "cpu")  # fmt: skip
    r = cli(*args, "--shard", "0/6", env=ENV)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 slides have no feature store" in r.stderr
    assert cli(*args, env=ENV).returncode == 0


def test_failures_leave_no_stale_outputs(trained, tmp_path):
    """A slide that fails loses its old attention file (heatmap draws every file); when all
    fail, the tables of the earlier call go too instead of looking current."""
    run, feats, table = _fresh(trained, tmp_path)
    entries = read_slide_table(table)
    predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert (run / "attention" / "bag002.h5").is_file()
    with h5py.File(feats / "bag002.h5", "r+") as f:
        f["features"][0, 0] = np.inf
    out = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert list(out.batch.failed) == ["bag002"]
    assert not (run / "attention" / "bag002.h5").exists()
    assert len(list((run / "attention").glob("*.h5"))) == 11
    for p in feats.glob("*.h5"):
        with h5py.File(p, "r+") as f:
            f["features"][0, 0] = np.nan
    out = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert len(out.batch.failed) == 12 and out.metrics is None
    assert not list((run / "attention").glob("*.h5"))
    assert not (run / "predictions.csv").exists() and not (run / "metrics.json").exists()


def test_rows_follow_the_slide_table_and_out_dir_is_command_line_only(trained, tmp_path, cli):
    run, feats, table = _fresh(trained, tmp_path)
    rows = list(csv.DictReader(open(table)))[::-1]  # not sorted by id
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    got = list(pd.read_csv(run / "predictions.csv").slide_id)
    assert got == [r["slide_id"] for r in rows]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"predict:\n  out-dir: {tmp_path / 'elsewhere'}\n")
    r = cli("predict", "--config", str(cfg), "--slides", str(table), "--run", str(run),
            "--features", str(feats), "--device", "cpu", env=ENV)  # fmt: skip
    assert r.returncode == 2 and "out-dir" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_a_slide_without_patches_is_a_warning_not_a_failure(trained, tmp_path):
    run, feats, table = _fresh(trained, tmp_path)
    with h5py.File(feats / "blank.h5", "w") as f:
        f["features"] = np.zeros((0, 8), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    from wsi_mil.slides.table import SlideEntry

    entries = [*read_slide_table(table), SlideEntry("blank", None, 1, None)]
    out = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert out.batch.exit_code == 0 and "no tissue" in out.batch.warnings["blank"]
    assert "blank" not in set(pd.read_csv(run / "predictions.csv").slide_id)
    assert not (run / "attention" / "blank.h5").exists()


def _write_rows(table: Path, rows: list[dict[str, str]]) -> None:
    with open(table, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _no_scoring(monkeypatch) -> None:
    """Make any scoring fail: a test that calls this afterwards asserts pure skips."""
    import wsi_mil.train.predict as pred

    def boom(*a, **k):
        raise AssertionError("a slide was scored again")

    monkeypatch.setattr(pred, "predict_bag", boom)


def _attrs(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


def test_label_and_split_edits_update_attention_files_without_scoring_again(
    trained, tmp_path, monkeypatch
):
    """Editing labels or splits in the slide table changes no probability: the rerun scores
    nothing (end to end it would re-encode every patch), rewrites only the edited slides'
    attrs, and the tables use the new labels and splits."""
    run, feats, table = _fresh(trained, tmp_path)
    out = tmp_path / "cohort"  # --out-dir: the table's splits count, not the run's splits.csv
    rows = list(csv.DictReader(open(table)))
    for r in rows:
        r["split"] = "test"
    _write_rows(table, rows)
    cfg = _cfg(tmp_path, run, feats, out_dir=out)
    assert len(predict_slides(cfg, read_slide_table(table), progress=False).batch.done) == 12
    probs = pd.read_csv(out / "predictions.csv").set_index("slide_id")["prob"]
    before = {p: _attrs(out / "attention" / f"{p}.h5") for p in ("bag001", "bag002")}

    new_label = 1 - int(rows[1]["label"])
    rows[1]["label"] = str(new_label)
    rows[2]["split"] = "val"
    _write_rows(table, rows)
    times = _mtimes(out)
    _no_scoring(monkeypatch)
    again = predict_slides(cfg, read_slide_table(table), progress=False)
    assert not again.batch.done and len(again.batch.skipped) == 12 and not again.batch.failed
    now = _mtimes(out)
    assert {p for p in now if now[p] != times[p]} == {"bag001.h5", "bag002.h5"}
    a1, a2 = _attrs(out / "attention" / "bag001.h5"), _attrs(out / "attention" / "bag002.h5")
    assert a1["label"] == new_label and a1["split"] == "test"
    assert a2["split"] == "val" and a2["label"] == before["bag002"]["label"]
    for sid, a in (("bag001", a1), ("bag002", a2)):
        assert a["prob"] == before[sid]["prob"] and a["inputs"] == before[sid]["inputs"]
        assert "label" not in json.loads(a["inputs"]) and "split" not in json.loads(a["inputs"])
    with h5py.File(out / "attention" / "bag001.h5") as f:  # datasets survive the update
        assert f["attention"].shape == f["coords"].shape[:1] and len(f["coords"]) > 0
    preds = pd.read_csv(out / "predictions.csv", keep_default_na=False).set_index("slide_id")
    assert preds.loc["bag001", "label"] == new_label and preds.loc["bag002", "split"] == "val"
    assert np.allclose(preds["prob"], probs.loc[preds.index], atol=1e-6)
    assert again.metrics["splits"]["val"]["n"] == 1 and again.metrics["splits"]["test"]["n"] == 11
    assert not list((out / "attention").glob(".*"))  # no temporary copies left

    times = _mtimes(out)  # a third call has nothing to update
    assert len(predict_slides(cfg, read_slide_table(table), progress=False).batch.skipped) == 12
    assert _mtimes(out) == times


def test_attention_files_of_the_previous_version_stay_current(trained, tmp_path, monkeypatch):
    """Files whose ``inputs`` still hold label and split (written before they left the key)
    are current when checkpoint and store are unchanged, even after a label edit."""
    run, feats, table = _fresh(trained, tmp_path)
    entries = read_slide_table(table)
    predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    for e in entries:  # what the previous version wrote
        with h5py.File(run / "attention" / f"{e.slide_id}.h5", "r+") as f:
            inputs = json.loads(f.attrs["inputs"])
            assert set(inputs) == {"model", "input"}
            inputs.update(label=e.label, split=str(f.attrs["split"]))
            f.attrs["inputs"] = json.dumps(inputs, sort_keys=True)
    times = _mtimes(run)
    _no_scoring(monkeypatch)
    again = predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    assert len(again.batch.skipped) == 12 and _mtimes(run) == times  # nothing rewritten

    rows = list(csv.DictReader(open(table)))
    rows[3]["label"] = str(1 - int(rows[3]["label"]))
    _write_rows(table, rows)
    third = predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    assert len(third.batch.skipped) == 12
    now = _mtimes(run)
    assert {p for p in now if now[p] != times[p]} == {"bag003.h5"}
    a = _attrs(run / "attention" / "bag003.h5")
    assert a["label"] == int(rows[3]["label"])
    assert set(json.loads(a["inputs"])) == {"model", "input"}  # migrated on the way


def test_a_moved_slide_updates_the_recorded_slide_path_without_scoring_again(
    trained, tmp_path, monkeypatch
):
    """heatmap draws the background from the attention file's slide_path: a slide table
    that points elsewhere now updates it (it used to keep the old path)."""
    run, feats, table = _fresh(trained, tmp_path)
    rows = list(csv.DictReader(open(table)))
    rows[0]["path"] = "old/x.tiff"
    _write_rows(table, rows)
    predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    sid = rows[0]["slide_id"]
    assert _attrs(run / "attention" / f"{sid}.h5")["slide_path"] == str(
        tmp_path.resolve() / "old" / "x.tiff"
    )
    rows[0]["path"] = "new/x.tiff"
    _write_rows(table, rows)
    times = _mtimes(run)
    _no_scoring(monkeypatch)
    again = predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    assert len(again.batch.skipped) == 12
    now = _mtimes(run)
    assert {p for p in now if now[p] != times[p]} == {f"{sid}.h5"}
    assert _attrs(run / "attention" / f"{sid}.h5")["slide_path"] == str(
        tmp_path.resolve() / "new" / "x.tiff"
    )
    # an empty path in the table keeps what the file records
    rows[0]["path"] = ""
    _write_rows(table, rows)
    predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    assert _attrs(run / "attention" / f"{sid}.h5")["slide_path"].endswith("new/x.tiff")


def test_an_attr_update_that_fails_leaves_the_old_file(tmp_path):
    """The update goes through a renamed copy: a failure midway leaves the old file whole."""
    from wsi_mil.train.predict import _update_attrs

    p = tmp_path / "a.h5"
    with h5py.File(p, "w") as f:
        f["coords"] = np.zeros((3, 2), np.int64)
        f["attention"] = np.ones(3, np.float32) / 3
        f.attrs["label"] = 0
        f.attrs["split"] = "train"
    data = p.read_bytes()
    with pytest.raises(TypeError):  # the label is set, then the split cannot be stored
        _update_attrs(p, {"label": 1, "split": object()})
    assert p.read_bytes() == data and list(tmp_path.iterdir()) == [p]
    _update_attrs(p, {"label": 1, "split": "val"})
    assert _attrs(p) == {"label": 1, "split": "val"}
    assert list(tmp_path.iterdir()) == [p]


def test_e2e_label_edit_encodes_no_patch_again(tmp_path, monkeypatch):
    """End to end a rescore re-encodes every patch: a label edit must not cause one. The
    patch store's significant_bits reach the attention file (heatmap's background)."""
    import dataclasses

    from wsi_mil.config import ModelConfig
    from wsi_mil.slides.table import SlideEntry
    from wsi_mil.tiling.patch_store import PatchStoreWriter
    from wsi_mil.train.e2e import E2EEncoder

    rng = np.random.default_rng(0)
    p, grid = 32, 3
    coords = np.array([(x * p, y * p) for y in range(grid) for x in range(grid)], np.int64)
    entries = []
    for i in range(4):
        attrs = {"level": 0, "downsample": 1.0, "patch_size": p, "level0_width": grid * p,
                 "level0_height": grid * p, "slide_path": "", "significant_bits": 12}  # fmt: skip
        with PatchStoreWriter(tmp_path / "w" / "patches" / f"s{i}.zarr", coords, attrs) as w:
            w.write_pixels(0, rng.integers(0, 255, (len(coords), p, p, 3), dtype=np.uint8))
            w.commit()
        entries.append(SlideEntry(f"s{i}", None, i % 2, None))
    run = tmp_path / "run"
    cfg = TrainConfig(work=tmp_path / "w", run=run, mode="e2e", epochs=1, feature_dim=8,
                      chunk_size=5, model=ModelConfig(pos_dim=4, attn_dim=4, hidden_dim=4),
                      device="cpu", early_stop="none", encoder_width=4, val_frac=0.0)  # fmt: skip
    train(cfg, entries, progress=False)
    pcfg = PredictConfig(work=tmp_path / "w", run=run, device="cpu")
    assert len(predict_slides(pcfg, entries, progress=False).batch.done) == 4
    assert _attrs(run / "attention" / "s1.h5")["significant_bits"] == 12

    def boom(*a, **k):
        raise AssertionError("patches encoded again")

    monkeypatch.setattr(E2EEncoder, "encode", boom)
    edited = [
        dataclasses.replace(e, label=1 - e.label) if e.slide_id == "s1" else e for e in entries
    ]
    again = predict_slides(pcfg, edited, progress=False)
    assert len(again.batch.skipped) == 4 and not again.batch.failed
    assert _attrs(run / "attention" / "s1.h5")["label"] == 1 - entries[1].label
    preds = pd.read_csv(run / "predictions.csv").set_index("slide_id")
    assert preds.loc["s1", "label"] == 1 - entries[1].label


def test_bits_nobody_can_look_up_any_more_are_kept(trained, tmp_path, monkeypatch):
    """An attention file's significant_bits stay when no store can tell them any more (the
    patch stores purged from scratch): unknown is not "8-bit"."""
    run, feats, table = _fresh(trained, tmp_path)
    entries = read_slide_table(table)
    predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    att = run / "attention" / "bag002.h5"
    with h5py.File(att, "r+") as f:  # recorded from a patch store that is gone now
        f.attrs["significant_bits"] = 12
    rows = list(csv.DictReader(open(table)))
    rows[2]["label"] = str(1 - int(rows[2]["label"]))  # an update of this file is due
    _write_rows(table, rows)
    _no_scoring(monkeypatch)
    again = predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    assert len(again.batch.skipped) == 12
    a = _attrs(att)
    assert a["label"] == int(rows[2]["label"]) and a["significant_bits"] == 12


def test_an_attr_update_that_cannot_be_written_keeps_the_probability(
    trained, tmp_path, monkeypatch, caplog
):
    """A current probability is not lost because its file's attrs could not be rewritten
    (disk full, a reader holding the file on Windows): a warning, the row stays."""
    import wsi_mil.train.predict as pred

    run, feats, table = _fresh(trained, tmp_path)
    entries = read_slide_table(table)
    predict_slides(_cfg(tmp_path, run, feats), entries, progress=False)
    rows = list(csv.DictReader(open(table)))
    rows[5]["label"] = str(1 - int(rows[5]["label"]))
    _write_rows(table, rows)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pred, "_update_attrs", full)
    _no_scoring(monkeypatch)
    again = predict_slides(_cfg(tmp_path, run, feats), read_slide_table(table), progress=False)
    assert not again.batch.failed and len(again.batch.skipped) == 12
    assert "could not update" in caplog.text
    got = pd.read_csv(run / "predictions.csv").set_index("slide_id")
    assert len(got) == 12 and got.loc["bag005", "label"] == int(rows[5]["label"])
