"""Cached training under torchrun: 2 ranks x --bags-per-step 1 == 1 process x --bags-per-step 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from bag_factory import make_bags, write_bags, write_table

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    from wsi_mil.config import TrainConfig
    from wsi_mil.slides.table import read_slide_table
    from wsi_mil.train import train
    d, name, b = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = TrainConfig(run=d / name, features=d / "feats", epochs=3, bags_per_step=b, device="cpu")
    train(cfg, read_slide_table(d / "slides.csv"), progress=False)
    """
)


@pytest.mark.slow
def test_two_ranks_equal_one_process_accumulating(tmp_path: Path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun"
    )
    if torchrun is None:
        pytest.skip("torchrun not installed")
    bags = make_bags(15, dim=8, n_min=10, n_max=20)  # 15 bags: the last step group is partial
    write_bags(bags, tmp_path / "feats")
    write_table(bags, tmp_path / "slides.csv")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "one", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), "two", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.stderr.count("training on") == two.stderr.count("training on") == 1  # rank 0
    for name in ("last.pt", "best.pt"):
        a = torch.load(tmp_path / "one" / "checkpoints" / name, weights_only=True)
        b = torch.load(tmp_path / "two" / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"] == 3
        for k in a["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
        assert [r["val_auc"] for r in a["history"]] == [r["val_auc"] for r in b["history"]]
