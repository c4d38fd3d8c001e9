#!/usr/bin/env bash
# Issue 20, item 5: the converged CPU comparison on ml-100k (SASRec, ReaRec-K0, ReaRec PRL K=2; sequences of 20,
# d = 64, early stopping with patience 5: bench/configs/cpu_converged.yaml), one run per process so that each run
# uses the code of its start; seed 2020 of all three models first, then 2021, then 2022. Resumable: a finished run
# is skipped (runs.jsonl), an interrupted one continues from its last finished epoch (compare.run_checkpoint_dir).
# From the repo root:  nohup nice -n 10 bash bench/converged_cpu.sh > /tmp/converged.log 2>&1 &
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
OUT=bench/results/converged_ml-100k_cpu
DATA=${DATA_PATH:-../shared/data}
run() {  # run <label> <run_compare arguments...>
  local label=$1; shift
  python run_compare.py "$@" --seeds $seed --datasets ml-100k --config_files bench/configs/cpu_converged.yaml \
    --out_dir $OUT --data_path=$DATA > $OUT/log_${label}_${seed}.txt 2>&1 || echo "run $label $seed failed: see $OUT/log_${label}_${seed}.txt"
  python run_compare.py --rebuild --out_dir $OUT --baseline SASRec > /dev/null 2>&1
}
for seed in ${SEEDS:-2020 2021 2022}; do
  run SASRec --models SASRec
  run ReaRec-K0 --variant "ReaRec-K0=ReaRec reason_step=0" --control ReaRec-K0=ReaRec
  run ReaRec --variant "ReaRec=ReaRec rearec_mode=prl reason_step=2"
done
