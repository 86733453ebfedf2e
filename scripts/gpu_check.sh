#!/usr/bin/env bash
# gpu_check.sh — verify `rapid-search --device cuda` end to end on a CUDA machine, in at most ~8 minutes.
#
#   bash scripts/gpu_check.sh
#
# On a machine with a CUDA GPU it
#   1. installs the project from its own files (pip --no-deps --no-index --no-build-isolation into a
#      temporary target folder; the machine's own torch/timm are used) plus the wheels carried in
#      .whl/ for whatever is missing (optuna and its dependencies), and puts that folder first on
#      PYTHONPATH; everything after runs with `python -P`, so the installed copy is what is tested;
#   2. runs the test suite's CUDA-marked tests (pytest -m cuda, RAPID_REQUIRE_CUDA=1: no silent skip);
#   3. runs a latency-budget search for DeiT-Tiny (`--budget 60%latency --device cuda`) at batch 1
#      and 64 and re-measures each exported schedule against the unreduced model (gpu_bench.py remeasure);
#   4. measures the speed table (benchmarks/gpu/gpu_bench.py speed): unreduced, RAPID and ToMe at
#      70/50/35% GFLOPs, batch 1/64/256, float32/float16/bfloat16, eager and torch.compile, for
#      DeiT-Tiny and random-weight DeiT-S, ViT-B and ViT-L, inside the time left;
#   5. writes env.json, steps.tsv, search-b*.json, lat-b*.yaml, speed.json, results.json, results.md
#      and logs/ into benchmarks/gpu/ (or $RAPID_GPU_OUT).
#
# Without a CUDA device it is a dry run: it checks what it can (the install, that the CUDA tests are
# collected, a tiny CPU latency search on timm's test_vit, and the benchmark's CPU smoke mode, whose
# results go to a temporary folder or $RAPID_GPU_OUT, never to benchmarks/gpu/), prints one line
# "gpu_check: no CUDA device ..." on stderr and exits 3.
#
# Exit status:
#   0  CUDA run: every step passed          1  a step failed (what ran is still written; see steps.tsv)
#   2  cannot start (no python with torch)  3  no CUDA device: the dry run passed, nothing measured on a GPU
#
# Environment (all optional):
#   PYTHON              interpreter with torch and timm (default: python3)
#   RAPID_GPU_OUT       output folder (default: benchmarks/gpu on CUDA; a new temporary folder on a dry run)
#   RAPID_GPU_HF_CACHE  Hugging Face hub cache holding DeiT-Tiny's weights (default: shared/hf-cache/hub in the
#                       checkout, else ../shared/hf-cache/hub); without them: random weights, said in steps.tsv
#   RAPID_GPU_DATA      calibration images for the search (default: shared/data/imagenet-calib, else
#                       ../shared/data/imagenet-calib); without them: synthetic images, said in steps.tsv
#   RAPID_GPU_WHEELS    folder of wheels to install when optuna is missing (default: .whl)
#   RAPID_GPU_TOTAL_S   seconds for the whole check (default: 470)
#   RAPID_GPU_TRIALS    search trials per batch size (default: 12)
#   RAPID_GIT_REV       commit to record (default: git rev-parse where the checkout has .git)
#   RAPID_GPU_SEARCH_BATCHES  batch sizes of the latency searches (default: "1 64")
#   RAPID_GPU_CALIB     calibration images per search (default: 128)
#   RAPID_GPU_BUDGET    the searches' budget (default: 60%latency)
#   RAPID_GPU_SPEED_ARGS  more options for gpu_bench.py speed, e.g. "--models vit_base_patch16_224 --compile off"
#   RAPID_GPU_REHEARSE=1  take the CUDA run's steps on the CPU (needs RAPID_GPU_OUT; the CUDA tests run with
#                       RAPID_CUDA_TEST_DEVICE=cpu): rehearses the whole flow on a machine without a GPU; slow, and
#                       its numbers mean nothing
#
# Preparing a run on the lent GPU machine (nvidia-h200: Python 3.12, torch 2.11, timm; no optuna, no
# network). In the checkout that the device tool sends, once:
#   echo /.whl/ >> .git/info/exclude      # (.gitignore already lists /.whl/); never commit wheels
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog==6.12.0 Mako==1.4.3
#   # (optuna needs alembic, colorlog, sqlalchemy, numpy, packaging, tqdm, PyYAML; alembic needs Mako,
#   #  typing-extensions; Mako needs MarkupSafe: the machine has all but the five above. Check with
#   #  `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist`.)  About 5.5 MB.
#   echo /shared/ >> .git/info/exclude    # weights and images for this run only, never committed
#   mkdir -p shared/hf-cache/hub shared/data
#   cp -r ../shared/hf-cache/hub/models--timm--deit_tiny_patch16_224.fb_in1k shared/hf-cache/hub/   # 22 MB
#   cp -r ../shared/data/imagenet-calib shared/data/                                                # 28 MB
# (shared/ in the checkout travels with every call; everything together must stay under 64 MiB.)
# Then one device call, carry [".whl"], timeout_s 560:
#   RAPID_GIT_REV=<commit> bash scripts/gpu_check.sh; rc=$?; tar -czf $OUT/gpu.tgz benchmarks/gpu; exit $rc
# and unpack gpu.tgz here; commit benchmarks/gpu/ (results.*, speed.json, search-*.json, lat-*.yaml, env.json, steps.tsv).

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${RAPID_GPU_TOTAL_S:-470}"
TRIALS="${RAPID_GPU_TRIALS:-12}"
WHEELS="${RAPID_GPU_WHEELS:-$ROOT/.whl}"
BENCH="$ROOT/benchmarks/gpu/gpu_bench.py"
REPORT="$ROOT/benchmarks/gpu/gpu_report.py"   # standard library only: fast
MODEL=deit_tiny_patch16_224
EXIT_FAILED=1 EXIT_USAGE=2 EXIT_NO_CUDA=3
START=$SECONDS
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

IN_DIR=(bash -c 'cd "$1" || exit 2; shift; exec "$@"' in-dir)   # IN_DIR DIR CMD...: run CMD in DIR
CKPT_ARGS=() SEARCH_EXTRA=() SPACE_ARGS=() HF_ENV=(HF_HUB_OFFLINE=1) REMEASURE_ROUNDS=30
say() { printf 'gpu_check: %s\n' "$*"; }
die() { printf 'gpu_check: error: %s\n' "$*" >&2; exit "$EXIT_USAGE"; }
left() { echo $(( TOTAL_S - (SECONDS - START) )); }
clean() { tr '\t\n' '  ' <<<"$*" | cut -c1-400; }
last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300; }

# run NAME LIMIT_S LOG CMD...: a step with a time limit; records "name rc seconds note" in steps.tsv
STEP_NOTE=""
FAILED=0
run() {
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS rc
    say "[$name] (limit ${limit}s) $*" | cut -c1-300
    if [ "$limit" -le 0 ]; then
        rc=124; echo "not started: no time left" >"$log"
    elif command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; rc=$?
    else
        "$@" >"$log" 2>&1; rc=$?
    fi
    local note=$STEP_NOTE
    if [ "$rc" -ne 0 ]; then
        FAILED=1
        [ "$rc" -eq 124 ] && note="timed out after ${limit}s; $note"
        note="$note last line: $(last_line "$log")"
        say "[$name] FAILED (exit $rc): $(last_line "$log")"
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$(clean "$note")" >>"$OUT/steps.tsv"
    STEP_NOTE=""
    return "$rc"
}

# ---- where we are ---------------------------------------------------------------------------------
command -v "$PY" >/dev/null 2>&1 || die "no python '$PY' — set PYTHON to an interpreter that has torch and timm"
PROBE="$("$PY" -c "
import torch, timm
try:
    import optuna
    has_optuna = 'optuna'
except ImportError:
    has_optuna = 'no-optuna'
print('cuda' if torch.cuda.is_available() else 'cpu', has_optuna)" 2>/dev/null)" \
    || die "$PY cannot import torch and timm — set PYTHON to an interpreter that has them"
if [ "${PROBE% *}" = cuda ]; then CUDA=1; else CUDA=0; fi
DEVICE=cuda
if [ "${RAPID_GPU_REHEARSE:-0}" = 1 ]; then
    [ -n "${RAPID_GPU_OUT:-}" ] || die "RAPID_GPU_REHEARSE=1 needs RAPID_GPU_OUT (a rehearsal never writes benchmarks/gpu/)"
    CUDA=1 DEVICE=cpu
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || die "cannot make a temporary folder — set TMPDIR to a writable folder"
trap 'rm -rf "$WORK"' EXIT
if [ "$CUDA" = 1 ]; then OUT="${RAPID_GPU_OUT:-$ROOT/benchmarks/gpu}"; else OUT="${RAPID_GPU_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}"; fi
mkdir -p "$OUT/logs" || die "cannot write the output folder $OUT — set RAPID_GPU_OUT to a writable folder"
LOGS="$OUT/logs"
: >"$OUT/steps.tsv"
rm -f "$OUT"/search-*.json "$OUT"/lat-b*.yaml "$OUT/speed.json" "$OUT/results.json" "$OUT/results.md"
say "$([ "$CUDA" = 1 ] && echo "CUDA run" || echo "dry run (no CUDA device)"); output in $OUT; ${TOTAL_S}s in all"

# ---- 1. install from the project's own files ------------------------------------------------------
SITE="$WORK/site"
mkdir -p "$WORK/src"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/src/" && cp -r "$ROOT/rapid_search" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
STEP_NOTE="pip install --no-deps --no-index --no-build-isolation --target (a temporary folder)"
run install 120 "$LOGS/install.log" "$PY" -m pip install --no-deps --no-index --no-build-isolation --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$SITE" "$WORK/src"
INSTALLED=$?
if [ "${PROBE#* }" != optuna ]; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        STEP_NOTE="optuna missing: installed $(cd "$WHEELS" && ls *.whl | tr '\n' ' ')"
        run wheels 120 "$LOGS/wheels.log" "$PY" -m pip install --no-deps --no-index --no-compile --no-cache-dir \
            --disable-pip-version-check --upgrade --target "$SITE" "$WHEELS"/*.whl
    else
        STEP_NOTE="optuna is not installed and $WHEELS has no wheels — the search will fail; carry them (see this script's header)"
        run wheels 5 "$LOGS/wheels.log" false
    fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$INSTALLED" -ne 0 ]; then
    export PYTHONPATH="$PYTHONPATH:$ROOT"   # go on with the checkout, so the other steps still report
    say "install failed: the remaining steps use the checkout's rapid_search"
fi
# Which rapid_search runs, and does the installed package find its default search space? (If not,
# pass the checkout's with --space and say so.)
CHECK="$(cd "$WORK" && "$PY" -P -c "
import rapid_search
print(rapid_search.__file__)
from rapid_search.search.space import SearchSpace
try:
    SearchSpace.load(None)
    print('space-ok')
except Exception:
    print('space-missing')" 2>&1)"
say "rapid_search from $(head -n 1 <<<"$CHECK")"
SPACE_NOTE=""
if [ "$(tail -n 1 <<<"$CHECK")" != space-ok ]; then
    if [ -f "$ROOT/search_spaces/default.yaml" ]; then
        SPACE_ARGS=(--space "$ROOT/search_spaces/default.yaml")
        SPACE_NOTE="the installed package has no default search space (SearchSpace.load(None) fails outside the checkout); passed --space search_spaces/default.yaml"
    else
        SPACE_NOTE="the installed package has no default search space and the checkout has none either: $(tail -n 1 <<<"$CHECK")"
    fi
    say "$SPACE_NOTE"
fi

# The test files with CUDA-marked tests (only these are collected: other test modules may need the checkout)
mapfile -t CUDA_TEST_FILES < <(cd "$ROOT" && grep -l -E 'mark\.cuda' tests/test_*.py)
[ "${#CUDA_TEST_FILES[@]}" -gt 0 ] || CUDA_TEST_FILES=(tests/test_cuda.py)

# search MODEL DEVICE BATCH TRIALS CALIB LIMIT BUDGET: a search (latency budget on CUDA), then the re-measurement of its
# schedule (REMEASURE_ROUNDS rounds); uses DATA, HF_ENV, CKPT_ARGS (both) and SEARCH_EXTRA (the search only)
search() {
    local model=$1 device=$2 batch=$3 trials=$4 calib=$5 limit=$6 budget=$7
    STEP_NOTE="$model, --budget $budget --device $device, batch $batch, $trials trials, $calib calibration images. $DATA_NOTE $WEIGHTS_NOTE $SPACE_NOTE"
    run "search-b$batch" "$limit" "$LOGS/search-b$batch.log" \
        "${IN_DIR[@]}" "$WORK" env "${HF_ENV[@]}" "$PY" -P -m rapid_search.cli search \
            --model "$model" --data "$DATA" --budget "$budget" --device "$device" --batch-size "$batch" \
            --trials "$trials" --calib-images "$calib" --seed 0 --progress plain "${SPACE_ARGS[@]}" \
            --storage "journal:$WORK/lat-b$batch.journal" --study-name "gpu-lat-b$batch" --out "$OUT/lat-b$batch.yaml" \
            "${CKPT_ARGS[@]}" "${SEARCH_EXTRA[@]}"
    local rc=$?
    if [ -f "$OUT/lat-b$batch.yaml" ]; then  # also the best schedule so far of a search stopped at its time limit
        STEP_NOTE="$( [ "$rc" -ne 0 ] && echo "the search stopped (exit $rc): its best schedule so far. ")$(grep -h -E 'schedule written|best schedule so far' "$LOGS/search-b$batch.log" | tail -n 1)"
        run "remeasure-b$batch" 90 "$LOGS/remeasure-b$batch.log" \
            env "${HF_ENV[@]}" "$PY" -P "$BENCH" remeasure --schedule "$OUT/lat-b$batch.yaml" \
                --out "$OUT/search-b$batch.json" --device "$device" --batch-size "$batch" --rounds "$REMEASURE_ROUNDS" \
                --search-log "$LOGS/search-b$batch.log" "${CKPT_ARGS[@]}" && say "[remeasure-b$batch] $(last_line "$LOGS/remeasure-b$batch.log")"
    else
        "$PY" -P "$REPORT" failed-step --out "$OUT/search-b$batch.json" --batch-size "$batch" --log "$LOGS/search-b$batch.log" \
            --status "search failed: $(last_line "$LOGS/search-b$batch.log")" >/dev/null 2>&1
    fi
}

# pick_inputs MODEL: its weights (a random --checkpoint when the real ones are absent) and calibration images
pick_inputs() {
    HF_CACHE=""; WEIGHTS_NOTE=""; CKPT_ARGS=()
    for c in "${RAPID_GPU_HF_CACHE:-}" "$ROOT/shared/hf-cache/hub" "$ROOT/../shared/hf-cache/hub"; do
        if [ -n "$c" ] && compgen -G "$c/models--timm--$1*" >/dev/null; then HF_CACHE="$(cd "$c" && pwd)"; break; fi
    done
    if [ -z "$HF_CACHE" ]; then
        "$PY" -P "$BENCH" random-checkpoint --model "$1" --out "$WORK/$1-random.pth" >/dev/null
        CKPT_ARGS=(--checkpoint "$WORK/$1-random.pth")
        WEIGHTS_NOTE="RANDOM weights: no $1 weights in a Hugging Face cache (set RAPID_GPU_HF_CACHE); latencies are unaffected, accuracy scores meaningless."
    else
        HF_ENV=(HF_HUB_OFFLINE=1 HF_HUB_CACHE="$HF_CACHE")
        WEIGHTS_NOTE="real weights from $HF_CACHE."
    fi
    DATA=""; DATA_NOTE=""
    for d in "${RAPID_GPU_DATA:-}" "$ROOT/shared/data/imagenet-calib" "$ROOT/../shared/data/imagenet-calib"; do
        if [ -n "$d" ] && [ -d "$d" ]; then DATA="$(cd "$d" && pwd)"; break; fi
    done
    if [ -z "$DATA" ]; then
        DATA="$WORK/synthetic-images"
        "$PY" -P "$BENCH" synthetic-images --out "$DATA" --count 64 >/dev/null
        DATA_NOTE="SYNTHETIC calibration images (no image folder found; set RAPID_GPU_DATA)."
    else
        DATA_NOTE="images from $DATA."
    fi
}

if [ "$CUDA" = 0 ]; then
    # ---- dry run: everything that can be checked without a GPU ----------------------------------------
    STEP_NOTE="collect only (${CUDA_TEST_FILES[*]}): the CUDA tests skip without a device"
    run cuda-tests-collect 120 "$LOGS/pytest-collect.log" \
        "${IN_DIR[@]}" "$ROOT" env "$PY" -P -m pytest -q --collect-only --strict-markers -m cuda -p no:cacheprovider "${CUDA_TEST_FILES[@]}"
    STEP_NOTE="env, speed (test_vit, batch 2, float32, eager) and remeasure on the CPU; also writes the dry search's inputs"
    run smoke 120 "$LOGS/smoke.log" "$PY" -P "$BENCH" smoke --dir "$OUT" --inputs "$WORK/dry"
    # the search and re-measurement commands of the CUDA run, on test_vit on the CPU. A GFLOPs budget:
    # whether a latency budget is reachable on a loaded CPU is up to timing noise (the CPU test suite
    # covers latency searches; the CUDA run does 60%latency)
    DATA="$WORK/dry/images" DATA_NOTE="synthetic images (dry run)." WEIGHTS_NOTE="random test_vit weights (dry run)."
    CKPT_ARGS=(--checkpoint "$WORK/dry/test_vit.pth") SEARCH_EXTRA=(--threads 1) REMEASURE_ROUNDS=3
    search test_vit cpu 4 2 16 120 50%GFLOPs
    run report 60 "$LOGS/report.log" "$PY" -P "$REPORT" report --dir "$OUT"
    if [ "$FAILED" != 0 ]; then
        printf 'gpu_check: dry run FAILED (no CUDA device here); see %s/steps.tsv and %s\n' "$OUT" "$LOGS" >&2
        exit "$EXIT_FAILED"
    fi
    printf 'gpu_check: no CUDA device (torch.cuda.is_available() is False) — dry run passed (install, CUDA tests collected, CPU latency search and benchmark smoke, results in %s); nothing was measured on a GPU; exit %d\n' "$OUT" "$EXIT_NO_CUDA" >&2
    exit "$EXIT_NO_CUDA"
fi

# ---- CUDA run (on $DEVICE: cuda, or cpu for a rehearsal) ---------------------------------------------
[ "$DEVICE" = cuda ] || say "REHEARSAL on $DEVICE: the CUDA run's steps, numbers meaningless"
run env 60 "$LOGS/env.log" "$PY" -P "$BENCH" env --device "$DEVICE" --out "$OUT/env.json"
say "$(cd "$OUT" && "$PY" -c 'import json; e = json.load(open("env.json")); print(e.get("gpu"), "driver", e.get("driver"), "torch", e.get("torch"), "CUDA", e.get("cuda"))' 2>&1 | tail -n 1)"

STEP_NOTE="pytest -m cuda ${CUDA_TEST_FILES[*]} with RAPID_REQUIRE_CUDA=1"
run cuda-tests 150 "$LOGS/pytest-cuda.log" \
    "${IN_DIR[@]}" "$ROOT" env RAPID_REQUIRE_CUDA=1 RAPID_CUDA_TEST_DEVICE="$DEVICE" "$PY" -P -m pytest -q -m cuda -p no:cacheprovider \
        "${CUDA_TEST_FILES[@]}"
say "[cuda-tests] $(last_line "$LOGS/pytest-cuda.log")"

pick_inputs "$MODEL"
for B in ${RAPID_GPU_SEARCH_BATCHES:-1 64}; do
    search "$MODEL" "$DEVICE" "$B" "$TRIALS" "${RAPID_GPU_CALIB:-128}" "$(( $(left) > 330 ? 110 : $(left) / 3 ))" "${RAPID_GPU_BUDGET:-60%latency}"
done

SPEED_S=$(( $(left) - 40 ))
STEP_NOTE="time budget ${SPEED_S}s"
run speed $(( SPEED_S > 0 ? SPEED_S + 30 : 0 )) "$LOGS/speed.log" \
    env "${HF_ENV[@]}" "$PY" -P "$BENCH" speed --device "$DEVICE" --out "$OUT/speed.json" \
        --time-budget "$(( SPEED_S > 10 ? SPEED_S : 10 ))" ${RAPID_GPU_SPEED_ARGS:-}

run report 60 "$LOGS/report.log" "$PY" -P "$REPORT" report --dir "$OUT"
say "done in $((SECONDS - START))s: $OUT/results.md"
[ "$FAILED" = 0 ] || { say "some steps failed: see $OUT/steps.tsv"; exit "$EXIT_FAILED"; }
exit 0
