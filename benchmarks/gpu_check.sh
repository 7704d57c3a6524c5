#!/usr/bin/env bash
# GPU check kit: one command for a lent GPU machine (the device tool's H200; any CUDA box works).
# It builds the C++ core there, installs the carried wheels, and runs each step under its own
# time limit, writing to $OUT one log (gpu_check.log), one JSON line per step (gpu_check.jsonl:
# status ok | failed | skipped, the reason, figures, targets) and a table (summary.md). A step
# that fails or runs out of time says why and the next one runs. The Python side of every step
# is benchmarks/gpu_steps.py (its docstring says what each step measures).
#
#   0 build            C++ core for that machine's Python (`pip install --no-deps --no-build-isolation -e .`)
#   1 kernel_tests     tests/test_kernels_*.py, CUDA cases, kernels compiled: values and gradients vs the torch refs
#   2 kernel_bench     benchmarks/bench_kernels.py; advantage >= 5x at 64K in 1 launch, loss vs torch.compile,
#                      fused log-prob peak memory <= 1/5 of materialised logits at V = 151,936
#   2b liger           fused log-prob (+ GRPO loss) vs Liger-Kernel's fused linear CE / GRPO loss: time, memory
#   3 policy_update    bf16 PolicyUpdater step, random Qwen2.5-VL-3B-sized model: packed (SDPA block mask)
#                      vs padded; flash-attn / flex arms when the machine and transformers support them
#   5 weight_transfer  3.1 GB bf16 state dict to a second process on the same GPU: CUDA IPC (raw, and
#                      spyglass's ipc transport) and disk, s/GB; the sync's NCCL weight-update group
#                      opened and broadcast on one rank (API check)
#   4 engine           HF backend on the GPU from step 3's checkpoint dir, bundled world: async vs lock-step
#
# ---------------------------------------------------------------------------- how a session runs it
# 1. Here, once (the wheels are ignored by git: /.whl/ is in .gitignore; else add it to
#    .git/info/exclude), download the wheels gpu_wheels.txt pins (about 35 MB):
#
#      grep -qx '/.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
#      .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(grep -v '^#' benchmarks/gpu_wheels.txt)
#
# 2. Check the kit on CPU (also part of the test suite): OUT=/tmp/gpu_dry bash benchmarks/gpu_check.sh --dry-run
#
# 3. The one device call (tool `run`), with the commit written in (there is no git there):
#
#      command:   SPYGLASS_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu_check.sh
#      carry:     [".whl"]
#      timeout_s: 540
#
#    The script ends by itself inside GPU_CHECK_BUDGET_S (default 500 s) and prints summary.md.
#    A rerun of some steps on the remaining device time (a fresh machine needs the build again):
#      command: SPYGLASS_COMMIT=<commit> bash benchmarks/gpu_check.sh --steps build,engine --budget 200
#      carry [".whl"], timeout_s 240. Call give_back unless rerunning at once. Step options
#    (`python3 benchmarks/gpu_steps.py -h`) go in GPU_STEPS_ARGS, e.g. "--questions 8 --layers 8".
#
# 4. Record the figures (files_at holds gpu_check.jsonl, summary.md, gpu_check.log):
#    - benchmarks/README.md, "Kernels (bench_kernels.py) — GPU figures": replace "No GPU was
#      available ..." with the date, commit, device and the tables of steps 1, 2 and 2b (bench
#      JSON line: figures.bench in kernel_bench's line); the policy update (3), weight transfer
#      (5) and engine (4) figures under their own headings with the commands above.
#    - README.md, the "Measured" table: the row "Triton kernels on GPU" gets the 64K advantage
#      speed-up and launches, loss vs torch.compile, the memory ratio; add rows for packed vs
#      padded tokens/s (3), async vs lock-step on the GPU (4), weight sync s/GB (5).
#    Figures of a step that failed or timed out are partial: say so, quote its reason.
# ------------------------------------------------------------------------------------------------
set -uo pipefail  # not -e: a failing step must not stop the others
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${GPU_CHECK_WORK:-/tmp/spyglass_gpu}
SITE=${GPU_CHECK_SITE:-/tmp/site}  # where the carried wheels are installed
BUDGET=${GPU_CHECK_BUDGET_S:-500}
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) ONLY=${2:?--steps needs a comma-separated list}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --steps a,b, --budget S)" >&2; exit 2 ;;
  esac
  shift
done

STEPS=(build kernel_tests kernel_bench liger policy_update weight_transfer engine)
declare -A CAP=([build]=150 [kernel_tests]=120 [kernel_bench]=150 [liger]=100 [policy_update]=170
                [weight_transfer]=90 [engine]=170)
# what each step imports (the dry run checks these resolve; the C++ core is built by step 0)
declare -A IMPORTS=(
  [build]="pybind11 scikit_build_core"
  [kernel_tests]="torch triton pytest spyglass.kernels.advantage spyglass.kernels.fused_logprob spyglass.kernels.policy_loss"
  [kernel_bench]="torch triton spyglass.kernels.advantage spyglass.kernels.fused_logprob spyglass.kernels.policy_loss spyglass.engine.metrics"
  [liger]="torch triton spyglass.kernels.fused_logprob spyglass.kernels.policy_loss"
  [policy_update]="torch transformers PIL spyglass.engine._core spyglass.engine.packer spyglass.engine.chat spyglass.engine.offline.tiny spyglass.engine.loader spyglass.trainer.update spyglass.trainer.distributed"
  [weight_transfer]="torch torch.multiprocessing safetensors.torch spyglass.trainer.weight_sync spyglass.trainer.weight_share"
  [engine]="torch transformers spyglass.engine._core spyglass.engine.rollout spyglass.engine.env spyglass.engine.scheduler spyglass.engine.loader spyglass.engine.backends.hf spyglass.engine.tools.visual spyglass.engine.tools.ocr spyglass.engine.tools.search spyglass.engine.tools.web spyglass.engine.tools.image_search spyglass.engine.tools.python_tool"
)
# python -c: for each STEP MODULES pair, import the modules; write logs/STEP.imports(.rc)
IMPORT_CHECK='
import importlib, sys
logs, a = sys.argv[1], sys.argv[2:]
for step, mods in zip(a[::2], a[1::2]):
    err = ""
    for m in mods.split():
        try:
            importlib.import_module(m)
        except BaseException as e:
            err = f"import {m}: {type(e).__name__}: {e}"
            break
    open(f"{logs}/{step}.imports", "w").write(err + "\n")
    open(f"{logs}/{step}.imports.rc", "w").write("1" if err else "0")
'
SEL=()
for s in "${STEPS[@]}"; do
  if [ -z "$ONLY" ] || [[ ",$ONLY," == *",$s,"* ]]; then SEL+=("$s"); fi
done
[ ${#SEL[@]} -gt 0 ] || { echo "gpu_check.sh: --steps $ONLY names none of: ${STEPS[*]}" >&2; exit 2; }

mkdir -p "$OUT" "$WORK/results" "$WORK/logs"
rm -f "$WORK"/results/*.json "$WORK"/logs/*.log
JSONL=$OUT/gpu_check.jsonl
LOG=$OUT/gpu_check.log
: > "$JSONL"
: > "$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
export GPU_CHECK_WORK=$WORK
START=$SECONDS
say() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$LOG"; }
STEPS_PY=benchmarks/gpu_steps.py
[ -f "$STEPS_PY" ] || { echo "gpu_check.sh: $STEPS_PY is missing" >&2; exit 1; }

# record STEP RC SECONDS TIMEOUT [extra args]: append the step's JSON line (a bare one if Python fails)
record() {
  local step=$1 rc=$2 secs=$3 tmo=$4; shift 4
  local mode=run; [ "$DRY" = 1 ] && mode=dry-run
  "$PY" "$STEPS_PY" record "$step" --rc "$rc" --seconds "$secs" --timeout "$tmo" --mode "$mode" \
      --result "$WORK/results/$step.json" --log "$WORK/logs/$step.log" --env "$WORK/env.json" "$@" >> "$JSONL" ||
    printf '{"step": "%s", "status": "failed", "reason": "record failed (rc %s)", "rc": %s, "seconds": %s}\n' \
      "$step" "$rc" "$rc" "$secs" >> "$JSONL"
  local last; last=$(tail -n 1 "$JSONL")
  say "step $step: $(echo "$last" | grep -o '"status": "[a-z-]*"' | head -n 1 | cut -d'"' -f4)" \
      "$(echo "$last" | grep -o '"reason": "[^"]*"' | head -n 1 | cut -d'"' -f4 | cut -c1-300)"
}

# spyglass must import for the steps after the build: else the build's --target dir, else the tree
ensure_spyglass() {
  "$PY" -c "import spyglass.kernels" 2>/dev/null && return 0
  if [ -d "$WORK/pkg/spyglass" ]; then
    export PYTHONPATH=$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}
    say "spyglass imported from $WORK/pkg"
  else  # no install: the packages from the tree (no C++ core: steps 3 and 4 will say so)
    mkdir -p "$WORK/shim/spyglass"
    for p in engine kernels trainer; do ln -sfn "$PWD/$p" "$WORK/shim/spyglass/$p"; done
    export PYTHONPATH=$WORK/shim${PYTHONPATH:+:$PYTHONPATH}
    say "spyglass is not installed (build failed or not run): imported from the tree through $WORK/shim"
  fi
}

# append a step's log to the one log that comes back (long logs: head and tail)
keep_log() {
  local f=$WORK/logs/$1.log
  [ -f "$f" ] || return 0
  echo "===================================================== $1" >> "$LOG"
  if [ "$(wc -c < "$f")" -gt 2000000 ]; then
    head -c 300000 "$f" >> "$LOG"; echo $'\n[... cut ...]' >> "$LOG"; tail -c 1500000 "$f" >> "$LOG"
  else
    cat "$f" >> "$LOG"
  fi
}

# ------------------------------------------------------------------------------- dry run (CPU)
if [ "$DRY" = 1 ]; then
  say "dry run of: ${SEL[*]} (python: $(command -v "$PY"))"
  "$PY" "$STEPS_PY" env --no-torch > "$WORK/env.json" 2>> "$LOG" || echo '{}' > "$WORK/env.json"
  # every step's dry run (one process: configs, commands) beside one import check per step
  "$PY" "$STEPS_PY" "${SEL[@]}" --dry-run --result-dir "$WORK/results" > "$WORK/logs/dry.log" 2>&1 &
  args=()
  for s in "${SEL[@]}"; do args+=("$s" "${IMPORTS[$s]}"); done
  "$PY" -c "$IMPORT_CHECK" "$WORK/logs" "${args[@]}" 2>> "$LOG" &
  wait
  cat "$WORK/logs/dry.log" >> "$LOG"
  for s in "${SEL[@]}"; do
    irc=$(cat "$WORK/logs/$s.imports.rc" 2>/dev/null || echo 1)
    ierr=$(grep -v '^\s*$' "$WORK/logs/$s.imports" 2>/dev/null | tail -n 1)
    cp "$WORK/logs/dry.log" "$WORK/logs/$s.log"
    record "$s" 0 0 0 --imports-rc "$irc" --imports-error "$ierr"
  done
  "$PY" "$STEPS_PY" summary --jsonl "$JSONL" --out "$OUT/summary.md" >> "$LOG"
  bad=$(grep -c -v '"status": "dry-run"' "$JSONL")
  say "dry run: ${#SEL[@]} steps, $bad not ok; $JSONL, $OUT/summary.md"
  [ "$bad" = 0 ]
  exit $?
fi

# ------------------------------------------------------------------------------------ GPU run
export SPYGLASS_CACHE=${SPYGLASS_CACHE:-$WORK/cache}  # the world and fixtures, written fresh there
say "steps: ${SEL[*]}; budget ${BUDGET}s; python $(command -v "$PY")"
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv; } >> "$LOG" 2>&1
if ls .whl/*.whl > /dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    say "wheels installed in $SITE: $(ls .whl | tr '\n' ' ')"
  else
    say "WARNING: the carried wheels did not install (see the log): liger and engine steps will say what is missing"
  fi
else
  say "WARNING: no .whl/ carried: liger is skipped and the engine's tools lack bm25s/rapidocr/imagehash/html2text"
fi
grep -v '^\s*#' benchmarks/gpu_wheels.txt | grep -v '^\s*$' | while read -r pin; do
  name=${pin%%==*}; ver=${pin#*==}
  ls .whl/ 2>/dev/null | grep -iq "^$(echo "$name" | tr '-' '_')-$ver-" ||
    say "WARNING: .whl/ has no wheel for $pin"
done
"$PY" "$STEPS_PY" env > "$WORK/env.json" 2>> "$LOG" || echo '{}' > "$WORK/env.json"
cat "$WORK/env.json" >> "$LOG"; echo >> "$LOG"

[[ " ${SEL[*]} " == *" build "* ]] || ensure_spyglass
for s in "${SEL[@]}"; do
  left=$((BUDGET - (SECONDS - START) - 15))
  tmo=${CAP[$s]}
  [ "$left" -lt "$tmo" ] && tmo=$left
  if [ "$tmo" -lt 30 ]; then
    record "$s" 0 0 0 --skip "the budget is spent ($((SECONDS - START)) s of ${BUDGET} s)"
    continue
  fi
  say "step $s: time limit ${tmo}s"
  t0=$SECONDS
  # shellcheck disable=SC2086  # GPU_STEPS_ARGS: options for gpu_steps.py, split on spaces
  timeout -k 15 "$tmo" "$PY" "$STEPS_PY" "$s" --result-dir "$WORK/results" ${GPU_STEPS_ARGS:-} \
      > "$WORK/logs/$s.log" 2>&1
  rc=$?
  record "$s" "$rc" $((SECONDS - t0)) "$tmo"
  keep_log "$s"
  [ "$s" = build ] && ensure_spyglass
done
"$PY" "$STEPS_PY" summary --jsonl "$JSONL" --out "$OUT/summary.md" | tee -a "$LOG"
say "done in $((SECONDS - START)) s: $OUT/gpu_check.jsonl, $OUT/summary.md, $OUT/gpu_check.log"
