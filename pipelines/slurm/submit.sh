#!/bin/bash
# Submit the whole pipeline as plain SLURM jobs chained with dependencies:
#   [synth ->] tile (array) -> extract (array) -> train (multi-GPU, torchrun) -> predict + heatmap
# (synth only for a config with a `synth:` section whose slides are not current.)
#
#   pipelines/slurm/submit.sh configs/X.yaml [TILE_TASKS] [EXTRACT_TASKS]
#
# 'afterany' (not 'afterok'): a task that exits 1 because some slides failed must not hold
# back the rest; the failures are in W/failures.csv. Extra sbatch flags: SBATCH_ARGS="...".
set -euo pipefail
CONFIG=${1:?usage: pipelines/slurm/submit.sh CONFIG.yaml [TILE_TASKS] [EXTRACT_TASKS]}
TILE_TASKS=${2:-32}
EXTRACT_TASKS=${3:-8}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs
PYTHON=${PYTHON:-python}
MODE=$($PYTHON -c "import sys; from wsi_mil.workflow import train_mode; print(train_mode(sys.argv[1]))" "$CONFIG")
SYNTH=$($PYTHON -c "import sys; from wsi_mil.workflow import plan_stages, synth_up_to_date as ok
print(int('synth' in plan_stages(sys.argv[1]) and not ok(sys.argv[1])))" "$CONFIG")
synth=none
after_synth=
if [ "$SYNTH" = 1 ]; then
  synth=$(sbatch --parsable ${SBATCH_ARGS:-} "$HERE/synth.sbatch" "$CONFIG")
  after_synth=--dependency=afterok:$synth
fi
tile=$(sbatch --parsable ${SBATCH_ARGS:-} $after_synth --array=0-$((TILE_TASKS - 1)) \
  "$HERE/tile.sbatch" "$CONFIG")
before_train=$tile
extract=none
if [ "$MODE" != "e2e" ]; then  # end-to-end training reads the patch stores itself
  extract=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterany:$tile \
    --array=0-$((EXTRACT_TASKS - 1)) "$HERE/extract.sbatch" "$CONFIG")
  before_train=$extract
fi
train=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterany:$before_train "$HERE/train.sbatch" "$CONFIG")
predict=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterok:$train "$HERE/predict.sbatch" "$CONFIG")
echo "submitted: synth=$synth tile=$tile extract=$extract train=$train predict=$predict"
echo "watch: squeue -u \$USER; logs in ./logs/"
