#!/usr/bin/env bash
# Issue 20, item 5: the converged CPU comparison on ml-100k (SASRec, ReaRec-K0, ReaRec PRL K=2; sequences of 20,
# d = 64, early stopping with patience 5: bench/configs/cpu_converged.yaml), one run per process so that each run
# uses the code of its start. Resumable: a finished run is skipped (runs.jsonl), an interrupted one continues from
# its last finished epoch (compare.run_checkpoint_dir).
# RUNS picks the runs as "label:seed ..." (default: every model for seed 2020, then 2021, then 2022); two streams
# with disjoint RUNS share the results on a 2-core CPU, one torch thread each.
# From the repo root:  nohup nice -n 10 bash bench/converged_cpu.sh > /tmp/converged.log 2>&1 &
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$PWD
OUT=bench/results/converged_ml-100k_cpu
DATA=${DATA_PATH:-../shared/data}
RUNS=${RUNS:-"SASRec:2020 ReaRec-K0:2020 ReaRec:2020 SASRec:2021 ReaRec-K0:2021 ReaRec:2021 SASRec:2022 ReaRec-K0:2022 ReaRec:2022"}
for entry in $RUNS; do
  label=${entry%%:*}; seed=${entry##*:}
  case $label in
    SASRec) args=(--models SASRec) ;;
    ReaRec-K0) args=(--variant "ReaRec-K0=ReaRec reason_step=0" --control ReaRec-K0=ReaRec) ;;
    ReaRec) args=(--variant "ReaRec=ReaRec rearec_mode=prl reason_step=2") ;;
    *) echo "unknown run label $label (SASRec, ReaRec-K0 or ReaRec)"; exit 2 ;;
  esac
  python run_compare.py "${args[@]}" --seeds $seed --datasets ml-100k --config_files bench/configs/cpu_converged.yaml \
    --out_dir $OUT --data_path=$DATA > $OUT/log_${label}_${seed}.txt 2>&1 || echo "run $label $seed failed: see $OUT/log_${label}_${seed}.txt"
  python run_compare.py --rebuild --out_dir $OUT --baseline SASRec > /dev/null 2>&1
done
