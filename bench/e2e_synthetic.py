"""End-to-end training on synthetic slides, scored on a HELD-OUT set made with another seed.

    .venv/bin/python bench/e2e_synthetic.py                          # configs/e2e-small.yaml
    .venv/bin/python bench/e2e_synthetic.py --n-train 40 --n-heldout 20 --out /tmp/e2e-syn

Steps (each a real ``wsi-mil`` subprocess with the config's options, so this is exactly what
a user runs): synth the training slides (config seed, split train/val) and the held-out
slides (``--heldout-seed``; ids renamed ``heldout_*`` so they never collide with training
ids), tile both, ``train --mode e2e``, ``predict`` on the held-out slides. Prints the
held-out image-level AUC, the share of positive held-out slides whose top-attended patch
overlaps a marker (markers.csv), and the wall time of every stage and of training.
Acceptance goal (issue 6): AUC >= 0.95, top-1 localisation >= 80 %, training < 15 min on
2 cores. The machine may be shared: wall times are then pessimistic.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wsi_mil(args: list[str], env: dict[str, str]) -> float:
    """Run ``python -m wsi_mil -q ARGS``; returns seconds; exits with its stderr on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "wsi_mil", "-q", *args], env=env, capture_output=True, text=True
    )
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"wsi-mil {' '.join(args)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return dt


def rename_heldout(folder: Path, prefix: str = "heldout_") -> Path:
    """Rewrite slides.csv / markers.csv of the held-out set with prefixed slide ids."""
    out = folder / "heldout_slides.csv"
    for src, dst in (
        (folder / "slides.csv", out),
        (folder / "markers.csv", folder / "heldout_markers.csv"),
    ):
        with open(src, newline="") as fh:
            rows = list(csv.DictReader(fh))
            fields = list(rows[0].keys()) if rows else ["slide_id"]
        for r in rows:
            r["slide_id"] = prefix + r["slide_id"]
            if "split" in r:
                r["split"] = "test"
        with open(dst, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default=str(ROOT / "configs" / "e2e-small.yaml"))
    ap.add_argument("--out", default="e2e-synthetic", help="working folder (slides, stores, run)")
    ap.add_argument("--n-train", type=int, default=200, help="training + validation slides (80/20)")
    ap.add_argument("--n-heldout", type=int, default=60, help="held-out slides")
    ap.add_argument("--heldout-seed", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads per process (1 is steadiest on a shared machine)",
    )
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    args = ap.parse_args()

    out = Path(args.out).resolve()
    cfg = str(Path(args.config).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    tr, ho, run = out / "train", out / "heldout", out / "run"
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    times["synth"] = wsi_mil(
        [
            "synth",
            "--config",
            cfg,
            str(tr / "slides"),
            "--n-slides",
            str(args.n_train),
            "--splits",
            "train=0.8,val=0.2",
        ],
        env,
    )
    times["synth"] += wsi_mil(
        [
            "synth",
            "--config",
            cfg,
            str(ho / "slides"),
            "--n-slides",
            str(args.n_heldout),
            "--seed",
            str(args.heldout_seed),
            "--splits",
            "",
        ],
        env,
    )
    ho_csv = rename_heldout(ho / "slides")
    times["tile"] = wsi_mil(
        [
            "tile",
            "--config",
            cfg,
            "--slides",
            str(tr / "slides" / "slides.csv"),
            "--work",
            str(tr / "work"),
        ],
        env,
    )
    times["tile"] += wsi_mil(
        ["tile", "--config", cfg, "--slides", str(ho_csv), "--work", str(ho / "work")], env
    )
    train_args = [
        "train",
        "--config",
        cfg,
        "--slides",
        str(tr / "slides" / "slides.csv"),
        "--work",
        str(tr / "work"),
        "--run",
        str(run),
        "--overwrite",
    ]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    times["train"] = wsi_mil(train_args, env)
    times["predict"] = wsi_mil(
        [
            "predict",
            "--config",
            cfg,
            "--slides",
            str(ho_csv),
            "--work",
            str(ho / "work"),
            "--run",
            str(run),
        ],
        env,
    )
    total = time.perf_counter() - t_all

    from wsi_mil.train.metrics import binary_metrics
    from wsi_mil.viz.localisation import localisation_report

    with open(run / "predictions.csv", newline="") as fh:
        preds = [r for r in csv.DictReader(fh) if r["slide_id"].startswith("heldout_")]
    m = binary_metrics([int(r["label"]) for r in preds], [float(r["prob"]) for r in preds])
    loc = localisation_report(run, ho / "slides" / "heldout_markers.csv", k=8)
    with open(run / "metrics.csv", newline="") as fh:
        hist = list(csv.DictReader(fh))
    n_patches = 0
    from wsi_mil.tiling.patch_store import PatchStore

    for p in (tr / "work" / "patches").glob("*.zarr"):
        n_patches += len(PatchStore.open(p))
    print(
        f"config: {args.config}; {args.n_train} training/validation slides ({n_patches} patches), {args.n_heldout} held-out slides (seed {args.heldout_seed}); {args.threads} thread(s)"
    )
    print(
        f"training: {len(hist)} epochs, last: "
        + ", ".join(f"{k}={hist[-1][k]}" for k in ("train_loss", "val_loss", "val_auc"))
    )
    print(
        f"HELD-OUT image-level AUC: {m['auc']:.3f}  (accuracy {m['accuracy']:.3f}, {m['n_pos']} pos / {m['n_neg']} neg)"
    )
    t1, tk = loc["top1_hit_rate"], loc["topk_hit_rate"]
    print(
        f"HELD-OUT localisation: top-attended patch on a marker in {100 * (t1 or 0):.1f}% of {loc['n_positive_with_markers']} positive slides (any of top-8: {100 * (tk or 0):.1f}%); mean patch AUC {loc['mean_patch_auc']}"
    )
    print(
        "wall time (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f", total {total:.0f}"
    )
    goals = {
        "auc >= 0.95": (m["auc"] or 0) >= 0.95,
        "top-1 localisation >= 80%": (t1 or 0) >= 0.8,
        "training < 15 min": times["train"] < 900,
    }
    print("goals: " + ", ".join(f"{k}: {'MET' if v else 'NOT MET'}" for k, v in goals.items()))
    (out / "e2e_synthetic.json").write_text(
        json.dumps(
            {"auc": m["auc"], "localisation": loc["top1_hit_rate"], "times": times, "total": total},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
