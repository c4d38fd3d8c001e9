#!/usr/bin/env bash
# The GPU plan (issue 20): one dataset's comparison table -- every catalogued model and control of
# recbole_reason/variants.py (PLAN), 3 seeds, per-user paired tests -- in parallel runs on the GPU machine, each call
# time-boxed to fit the device tool's 10-minute limit, resumable across calls (finished runs come back and are skipped).
#
#   bash bench/gpu_plan.sh prepare          # HERE, once: wheels for Python 3.12 into .whl/ (git-ignored), data into .data/
#   device run, carry [".whl", ".plan_resume", ".data"], timeout_s 600:
#       bash bench/gpu_plan.sh run          # THERE: install, run PART of the table until PLAN_SECONDS, results in $OUT
#   bash bench/gpu_plan.sh collect DIR      # HERE: merge a call's returned files (DIR = the reply's files_at) into
#                                           # bench/results/gpu_<dataset>/ and rebuild its tables; commit, call again
#   bash bench/gpu_plan.sh dry              # HERE: the same run path on the CPU at tiny size (tests' tiny data),
#                                           # writing the files the GPU run writes, into bench/results/gpu_plan_dryrun/
#
# Settings (environment): DATASET (ml-100k), PART (the catalogue's parts, comma-separated: rearec | rearec-official
# | lares | lares-official | r2ec | reg4rec | all; SASRec, the baseline, is in every part; default rearec; one call
# per part by the sizing in README "GPU plan"; runs go seed by seed, so a call cut short has every model of its
# first seeds), JOBS (runs at once; 12 of the 16 cores: RecBole's data pipeline is CPU-bound), THREADS (torch threads
# per run; 1), PLAN_SECONDS (wall time of the runs before the call packs up; 480 of the call's 600), SEEDS
# (2020,2021,2022). bench/configs/gpu_plan.yaml holds the protocol and its epoch caps.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bench/gpu_plan.sh prepare|run|collect DIR|dry}
DATASET=${DATASET:-ml-100k}
SEEDS=${SEEDS:-2020,2021,2022}
PART=${PART:-rearec}
JOBS=${JOBS:-12}
THREADS=${THREADS:-1}
PLAN_SECONDS=${PLAN_SECONDS:-480}
RESULTS=bench/results/gpu_${DATASET}
WHEELS="recbole==1.2.1 colorlog==4.7.2 texttable==1.7.0"  # what the GPU image lacks (KINDS.md's package list)

models() {  # the PART's labels from the catalogue, comma-separated (recbole_reason.variants.plan_part)
  python3 -c "import sys; from recbole_reason.variants import plan_part; print(','.join(plan_part(sys.argv[1])))" "$PART"
}

pack() {  # pack <out_dir> <dest>: at most 8 files come back from $OUT, two folders down at most
  local out=$1 dest=$2
  mkdir -p "$dest"
  for f in runs.jsonl comparison.md comparison.csv comparison_paired.csv comparison.png; do
    [[ -f $out/$f ]] && cp "$out/$f" "$dest/"
  done
  local parts=(); for d in per_user logs plan.log; do [[ -e $out/$d ]] && parts+=("$d"); done
  tar -czf "$dest/artifacts.tar.gz" -C "$out" "${parts[@]}"  # per-user values, one log per run, the plan's log
  # runs stopped by PLAN_SECONDS: their checkpoint folders (best model + per-epoch resume state), so that the next
  # call continues them from their last epoch instead of from scratch (compare.run_checkpoint_dir)
  local states; states=$(find saved/compare -path "saved/compare/$(basename "$out")-*" -name '*-resume.pth' \
    -printf '%h\n' 2>/dev/null | sort -u)
  if [[ -n $states ]]; then
    tar -czf "$dest/resume.tar.gz" $states
    if (( $(stat -c %s "$dest/resume.tar.gz") > 15 * 1024 * 1024 )); then
      rm "$dest/resume.tar.gz"; echo "resume states over 15 MiB: not returned; those runs restart next call" >> "$dest/../plan_note.txt"
    fi
  fi
}

plan() {  # plan <out_dir> <config files> [extra run_compare settings...]: the timed, parallel, resumable runs
  local out=$1 configs=$2; shift 2
  mkdir -p "$out/logs"
  local start=$SECONDS
  set +e
  timeout --signal=INT "$PLAN_SECONDS" python3 run_compare.py --models "$(models)" --datasets "$DATASET" \
    --seeds "$SEEDS" --baseline SASRec --jobs "$JOBS" --threads "$THREADS" --config_files "$configs" \
    --out_dir "$out" "$@" > "$out/logs/plan.log" 2>&1
  local rc=$?
  set -e
  echo "plan: runs ended with rc=$rc after $((SECONDS - start)) s (124/130: stopped at PLAN_SECONDS=$PLAN_SECONDS)" | tee -a "$out/logs/plan.log"
  mv "$out/logs/plan.log" "$out/plan.log"
  python3 run_compare.py --rebuild --out_dir "$out" --baseline SASRec > /dev/null
}

case $MODE in
  prepare)
    mkdir -p .whl .data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
    if [[ $DATASET != ml-100k ]]; then cp -r "../shared/data/$DATASET" .data/; fi  # ml-100k ships inside recbole
    du -sh .whl .data ;;
  run)
    : "${OUT:?run is for the GPU machine, where the device tool sets OUT}"
    # Python 3.12 there has torch, numpy, scipy, pandas, sklearn, yaml, tensorboard, tqdm, matplotlib; RecBole and
    # its two small pure-Python needs come as wheels, RecBole without its ray pin (--no-deps; recbole-reason never
    # imports ray). requirements/install_no_ray.sh (issue 16) needs a package index, which that machine lacks.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
    work=/tmp/plan/gpu_${DATASET}
    mkdir -p "$work" && { [[ -d $RESULTS ]] && cp -r "$RESULTS/." "$work/" || true; }  # earlier calls' runs: skipped
    [[ -f .plan_resume/resume.tar.gz ]] && tar -xzf .plan_resume/resume.tar.gz  # runs an earlier call stopped
    data=(); [[ $DATASET != ml-100k ]] && data=(--data_path=.data)
    plan "$work" bench/configs/gpu_plan.yaml "${data[@]}"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader >> "$work/plan.log" || true
    pack "$work" "$OUT/gpu_${DATASET}"
    cat "$work/comparison.md" ;;
  collect)
    from=${2:?collect DIR: the folder the device reply names as files_at}
    src=$(find "$from" -name runs.jsonl -path "*gpu_${DATASET}*" -printf '%h\n' | head -1)
    mkdir -p "$RESULTS/per_user"
    touch "$RESULTS/runs.jsonl"
    python3 - "$src/runs.jsonl" "$RESULTS/runs.jsonl" <<'PY'
import sys
new, old = sys.argv[1:]
have = set(open(old).read().splitlines())
with open(old, "a") as f:
    f.writelines(line + "\n" for line in open(new).read().splitlines() if line.strip() and line not in have)
PY
    tar -xzf "$src/artifacts.tar.gz" -C "$RESULTS" per_user 2>/dev/null || true
    cp "$src/artifacts.tar.gz" "$RESULTS/artifacts_$(date +%Y%m%d_%H%M%S).tar.gz"  # the call's logs, kept
    mkdir -p .plan_resume && rm -f .plan_resume/resume.tar.gz  # git-ignored; carry it in the next call
    [[ -f $src/resume.tar.gz ]] && cp "$src/resume.tar.gz" .plan_resume/ && echo "stopped runs: carry .plan_resume next call"
    PYTHONPATH=$PWD python3 run_compare.py --rebuild --out_dir "$RESULTS" --baseline SASRec > /dev/null
    echo "merged into $RESULTS: $(wc -l < "$RESULTS/runs.jsonl") runs" ;;
  dry)
    # The run path at tiny size on this CPU: the tests' tiny data, tiny sizes, one epoch per stage; writes what the
    # GPU run writes (the packed files of $OUT) into bench/results/gpu_plan_dryrun/.
    export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    DATASET=tiny JOBS=${JOBS_DRY:-2} THREADS=1 PLAN_SECONDS=${PLAN_SECONDS_DRY:-3000} PART=${PART_DRY:-all}
    work=/tmp/plan_dry/gpu_tiny; rm -rf /tmp/plan_dry
    plan "$work" "bench/configs/gpu_plan.yaml tests/tiny.yaml" --epochs=1 --rl_epochs=1 --recpo_epochs=1 \
      --pars_epochs=1 --mpq_epochs=2 --mpq_cf_epochs=1 --depth_scaling_recurrences=[1,2] \
      --eval_batch_size=512 --warmup_epochs=0
    rm -rf bench/results/gpu_plan_dryrun
    pack "$work" bench/results/gpu_plan_dryrun
    cp "$work/comparison.md" bench/results/gpu_plan_dryrun/comparison.md
    ls -la bench/results/gpu_plan_dryrun ;;
  *) echo "unknown mode $MODE: prepare | run | collect DIR | dry" >&2; exit 2 ;;
esac
