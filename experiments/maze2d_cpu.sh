#!/usr/bin/env bash
# TD3+BC on a maze2d task, three arms x three seeds, at a scale two CPU cores can run (docs/results.md), and one
# run of the ablation that gives DyDiff a perfect DM (--rollout-states simulator-replay).
#
#   bash experiments/maze2d_cpu.sh                # maze2d-large (D4RL's fixed-goal task), both lanes in the background
#   bash experiments/maze2d_cpu.sh 1              # one lane in the foreground (lane 2's DyDiff runs wait for lane 1's models)
#   ENV_ID=maze2d-medium RUNS=runs-medium bash experiments/maze2d_cpu.sh
#   ENV_ID=local/pointmaze/large-v3 RUNS=runs-large-gc bash experiments/maze2d_cpu.sh   # Minari's goal-conditioned task
#   bash experiments/maze2d_cpu.sh ladder         # the ladder of ablations (docs/results.md), both lanes
#   bash experiments/maze2d_cpu.sh d4rl-size      # the base on D4RL maze2d-large-v1's size (4M steps), three seeds
#   bash experiments/maze2d_cpu.sh synther        # the paper's baseline, SynthER: its CPU model, then 3 seeds, both lanes
#   bash experiments/maze2d_cpu.sh synther-perfect  # SynthER with the simulator's next states and rewards, one lane
#
# Logs in $RUNS/lane{1,2}.log. Each lane runs its jobs one after the other with one torch thread, so the two lanes
# share two cores (two one-thread runs made 1.2x more steps per second in all than one two-thread run). Run it again
# after a kill: finished runs are skipped, killed ones resume from their last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ENV_ID=${ENV_ID:-maze2d-large}
OUT=${RUNS:-runs-large}
MODELS=${MODELS:-models-cpu}
export OMP_NUM_THREADS=1 DYDIFF_OFFLINE=1

# The CPU configuration of the models (docs/scripts.md, "Presets"); both tasks of one dataset share the DM and the ensemble.
PRETRAIN=(--env-id "$ENV_ID" --preset cpu --models-dir "$MODELS" --dataset-steps 1000000)
# Paper (Table 4 / CORL): 1M steps, evaluation every 5k, B_r 2048 every 500 steps, a 2M-transition buffer.
# The data: 1M generated steps (Minari's size; the results so far were all made on it) unless DATA_STEPS says otherwise.
DATA_STEPS=${DATA_STEPS:-1000000}
RUN=(--env-id "$ENV_ID" --models-dir "$MODELS" --total-steps 200000 --eval-freq 1000
     --eval-episodes 10 --rollout-freq 500 --rollout-batch-size 64 --synthetic-buffer-size 62000)
SUMMARIES=${SUMMARIES:-results/$(echo "$ENV_ID" | sed 's/[^A-Za-z0-9_.-]/_/g')}
FOLDER="$MODELS/$(echo "$ENV_ID" | sed 's/[^A-Za-z0-9_.-]/_/g')"

run() {  # run ARM SEED FLAGS...: one training run, skipped if finished or summarized in $SUMMARIES, resumed if killed
  local arm=$1 seed=$2 dir="$OUT/$1-seed$2"; shift 2
  if compgen -G "$SUMMARIES/*__dydiff_td3bc-${arm}__${seed}__*.json" > /dev/null; then
    echo "$arm seed $seed: summary committed in $SUMMARIES"; return
  fi
  local folder; folder=$(ls -d "$dir"/*/ 2>/dev/null | head -1 || true)
  if [[ -n "$folder" && -f "$folder/result.json" ]]; then echo "$arm seed $seed: finished ($folder)"; return; fi
  if [[ -n "$folder" && -f "$folder/checkpoint.pt" ]]; then
    echo "$arm seed $seed: resuming $folder"; $PY dydiff_td3bc.py --resume "$folder"
  else
    rm -rf "$dir"; echo "$arm seed $seed: starting"
    $PY dydiff_td3bc.py "${RUN[@]}" --dataset-steps "$DATA_STEPS" --seed "$seed" --exp-name "dydiff_td3bc-$arm" --runs-dir "$dir" "$@"
  fi
}

models_ready() { [[ -f $FOLDER/dm.pt && -f $FOLDER/dynamics.pt && -f $FOLDER/reward.pt ]]; }

# Seed 1 of every arm comes first, so that a first comparison exists early.
lane1() {
  $PY pretrain_models.py "${PRETRAIN[@]}"  # keeps what is already trained, resumes the DM
  run dydiff 1; run dydiff 2; run m0 3 --num-iterations 0; run dydiff 3
}

lane2() {
  run base 1 --no-dydiff
  until models_ready; do echo "waiting for lane 1's pretraining ($FOLDER)"; sleep 120; done
  run m0 1 --num-iterations 0; run base 2 --no-dydiff; run base 3 --no-dydiff; run m0 2 --num-iterations 0
  run simstates 1 --rollout-states simulator-replay  # the ablation: DyDiff with a perfect DM (the simulator's states)
}

# The ladder: DyDiff's approximations swapped for the real thing one at a time (docs/results.md). Rung a needs no
# pretrained model, so its lane starts at once; the other lane pretrains first.
SIM=(--rollout-states simulator)
REPLAY=(--rollout-states simulator-replay)
committed_models() {  # the committed CPU models (results/models-cpu/README.md): the ladder's ensemble and reward model, SynthER
  if [[ -d "results/models-cpu/$ENV_ID" ]]; then mkdir -p "$FOLDER"; cp -n "results/models-cpu/$ENV_ID"/*.pt "$FOLDER"/; fi
}
wait_for_ladder_models() {  # lane 2 makes them where none are committed
  until [[ -f $FOLDER/dynamics.pt && -f $FOLDER/reward.pt ]]; do echo "waiting for lane 2's models ($FOLDER)"; sleep 120; done
}
# The order makes each session's two runs per lane (about 1 h 15 min each, one thread beside the other lane) a
# balanced step: seed 1 of every rung first, then seeds 2 and 3, then rung e (the best rung, real on-policy rollouts
# with true rewards, at the paper's rollout volume: B_r 2,048 every 500 steps, a 2M-transition buffer), then c with
# ten rounds of the perfect DM (experiments/draft_gap.py: ten rounds recover most of what one round loses).
VOLUME=(--rollout-batch-size 2048 --synthetic-buffer-size 2000000)
ladder1() {
  committed_models
  run sim-true 1 "${SIM[@]}" --rollout-rewards simulator
  wait_for_ladder_models
  run replay-cond 1 "${REPLAY[@]}" --stored-actions conditioning; run sim-true 2 "${SIM[@]}" --rollout-rewards simulator
  run sim-true 3 "${SIM[@]}" --rollout-rewards simulator; run replay-cond 2 "${REPLAY[@]}" --stored-actions conditioning
  run replay-cond 3 "${REPLAY[@]}" --stored-actions conditioning
  run sim-true-volume 1 "${SIM[@]}" --rollout-rewards simulator "${VOLUME[@]}"
  run simstates-m10 1 "${REPLAY[@]}" --num-iterations 10
}

ladder2() {
  committed_models
  $PY pretrain_models.py "${PRETRAIN[@]}" --models dynamics reward  # the ladder uses no DM
  run sim-model 1 "${SIM[@]}"; run simstates 2 "${REPLAY[@]}"; run sim-model 2 "${SIM[@]}"
  run sim-model 3 "${SIM[@]}"; run simstates 3 "${REPLAY[@]}"
  run sim-true-volume 2 "${SIM[@]}" --rollout-rewards simulator "${VOLUME[@]}"
  run simstates-m10 2 "${REPLAY[@]}" --num-iterations 10
}

# The base on D4RL maze2d-large-v1's size (4M steps; the default of maze2d-large) beside the 1M base: does the data
# size move it? Lane 1 generates the data (14 min beside two runs), lane 2 waits for it.
d4rl_size1() {
  DATA_STEPS=4000000
  $PY -m common.datasets "$ENV_ID" --dataset-steps "$DATA_STEPS" --offline
  run base-4m 1 --no-dydiff; run base-4m 3 --no-dydiff
}
d4rl_size2() {
  DATA_STEPS=4000000
  until $PY -c "import sys; from common.datasets import load_dataset as l; l('$ENV_ID', offline=True, generate=False, dataset_steps=$DATA_STEPS, progress=False)" 2>/dev/null; do
    echo "waiting for lane 1's data"; sleep 60
  done
  run base-4m 2 --no-dydiff
}

# SynthER (docs/scripts.md, "SynthER"): the CPU-size model (a 0.45M-parameter residual MLP, 40k steps; committed in
# results/models-cpu, so pretraining keeps it), then its 5M transitions (SynthER's count, with 32 sampler steps instead
# of its 128: on a briefly trained CPU model of this task the same one-step error, wall share and reward error at a
# quarter of the cost), generated once with both threads before the runs (python -m common.synther) and read by every
# run, then TD3+BC on them alone (SynthER's offline setting) at the same protocol as the other arms; the RUN array's
# rollout flags go unused. Lane 1 pretrains if needed and generates while lane 2 waits, then both train.
SYNTHER=(--augment synther --synther-samples 5000000 --synther-sampler-steps 32)
synther1() {
  committed_models
  $PY pretrain_models.py "${PRETRAIN[@]}" --models synther --synther-sampler-steps 32  # keeps a finished model
  OMP_NUM_THREADS=2 $PY -m common.synther "$ENV_ID" --models-dir "$MODELS" --dataset-steps "$DATA_STEPS" --offline \
    --synther-samples 5000000 --synther-sampler-steps 32
  run synther 1 "${SYNTHER[@]}"; run synther 3 "${SYNTHER[@]}"
}
synther2() {
  committed_models
  until compgen -G "$FOLDER/synther_samples_*" > /dev/null; do echo "waiting for lane 1's SynthER transitions"; sleep 120; done
  run synther 2 "${SYNTHER[@]}"
}

# SynthER with perfect dynamics and reward (--synther-next-states simulator): the same generated (s, a), each s' and
# reward from the real simulator. Does SynthER fall behind the base through its transitions' errors, or through which
# (s, a) it samples? One lane, seeds 1 and 2 (after `synther`, whose transitions it reads).
synther_perfect() {
  committed_models
  until compgen -G "$FOLDER/synther_samples_*" > /dev/null; do echo "waiting for the SynthER transitions"; sleep 120; done
  run synther-simnext 1 "${SYNTHER[@]}" --synther-next-states simulator
  run synther-simnext 2 "${SYNTHER[@]}" --synther-next-states simulator
}

start() {  # start LANE_A LANE_B: both lanes in the background
  mkdir -p "$OUT"
  setsid nohup bash "$0" "$1" > "$OUT/$1.log" 2>&1 &
  setsid nohup bash "$0" "$2" > "$OUT/$2.log" 2>&1 &
  echo "started; follow with: tail -f $OUT/$1.log $OUT/$2.log"
}

case "${1:-both}" in
  1) lane1 ;;
  2) lane2 ;;
  ladder1) ladder1 ;;
  ladder2) ladder2 ;;
  d4rl-size1) d4rl_size1 ;;
  d4rl-size2) d4rl_size2 ;;
  d4rl-size) start d4rl-size1 d4rl-size2 ;;
  both) start 1 2 ;;
  ladder) start ladder1 ladder2 ;;
  synther1) synther1 ;;
  synther2) synther2 ;;
  synther) start synther1 synther2 ;;
  synther-perfect) synther_perfect ;;
  *) echo "usage: [ENV_ID=...] [RUNS=...] bash $0 [1|2|both|ladder1|ladder2|ladder|d4rl-size1|d4rl-size2|d4rl-size|synther1|synther2|synther|synther-perfect]" >&2; exit 2 ;;
esac
