#!/usr/bin/env bash
# The wheel is the product: build it, install it on its own into a fresh venv (no editable install,
# no source tree on the path, the lock's versions), and run what a user of `pip install` runs:
#   1. runtime only (pip install rapid-search): the README's Python API example works, and the
#      search answers in one line which extra to install (exit 2);
#   2. with the search extras: the README's main command (a 2-trial search on ../shared, CPU)
#      writes a schedule, found through the default search space shipped inside the wheel.
# Usage: bash scripts/wheel_check.sh            (make wheel-check; .ci/run runs it after make test)
# Environment: PYTHON (python3), SHARED (../shared), KEEP=1 keeps the temporary folder.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
SHARED=$(cd "${SHARED:-$repo/../shared}" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/rapid-wheel.XXXXXX")
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$tmp"' EXIT
say() { printf 'wheel_check: %s\n' "$*" >&2; }

export HF_HUB_CACHE="$SHARED/hf-cache/hub" HF_HUB_OFFLINE=1
unset PYTHONPATH RAPID_SHARED

say "building the wheel"
"$PYTHON" -m pip wheel -q --no-deps -w "$tmp/dist" "$repo"
whl=$(ls "$tmp"/dist/rapid_search-*.whl)
say "built $(basename "$whl")"
# List the wheel into a file first: under pipefail, `unzip -l | grep -q` fails whenever grep exits
# on its match before unzip has written the rest (SIGPIPE), a race that once failed CI.
unzip -l "$whl" > "$tmp/wheel-files.txt"
for f in rapid_search/search/spaces/default.yaml rapid_search/py.typed; do
    grep -q " $f\$" "$tmp/wheel-files.txt" || { say "ERROR: $f is not in the wheel"; exit 1; }
done

say "fresh venv, runtime dependencies only (pip install rapid-search)"
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q -c "$repo/constraints.txt" pip
"$py" -m pip install -q -c "$repo/constraints.txt" "$whl"
cd "$tmp"   # outside the source tree; -I below also keeps the current folder off sys.path
"$py" -I -c 'import rapid_search, sys; p = rapid_search.__file__; print(p); sys.exit(0 if p.startswith(sys.prefix) else "rapid_search imported from outside the venv: " + p)'
for m in optuna rich matplotlib; do
    if "$py" -I -c "import $m" 2>/dev/null; then say "ERROR: $m is installed without the extras"; exit 1; fi
done

# The README's Python API example, verbatim (run from the repo root for its relative schedule path).
"$py" -I - <<EOF > "$tmp/api_example.py"
import re, pathlib
text = pathlib.Path("$repo/README.md").read_text()
print(re.search(r"## Python API\n\n\`\`\`python\n(.*?)\`\`\`", text, re.S).group(1))
EOF
say "README Python API example (runtime only)"
(cd "$repo" && "$py" -I "$tmp/api_example.py") | tee "$tmp/api.out"
grep -Eq '^tensor\(\[197,' "$tmp/api.out" || { say "ERROR: the API example printed no token counts"; exit 1; }

say "the search without its extras must name the extra (exit 2)"
set +e
"$tmp/venv/bin/rapid-search" --model deit_tiny_patch16_224 --data "$SHARED/data/imagenet-calib" --trials 2 2> "$tmp/err.txt"
rc=$?
set -e
cat "$tmp/err.txt" >&2
[[ $rc == 2 ]] || { say "ERROR: exit $rc, expected 2"; exit 1; }
grep -q "pip install 'rapid-search\[search\]'" "$tmp/err.txt" || { say "ERROR: the message does not name the extra"; exit 1; }
[[ $(wc -l < "$tmp/err.txt") == 1 ]] || { say "ERROR: not one line"; exit 1; }

say "with the search extras (pip install 'rapid-search[search]'): the README's main command, 2 trials"
"$py" -m pip install -q -c "$repo/constraints.txt" "${whl}[search]"
"$tmp/venv/bin/rapid-search" search --model deit_tiny_patch16_224 --data "$SHARED/data/imagenet-calib" \
    --budget 50%GFLOPs --device cpu --trials 2 --calib-images 64 --batch-size 32 --progress plain \
    --out "$tmp/quickstart.yaml"
test -s "$tmp/quickstart.yaml" && test -s "$tmp/studies/"*.journal
"$tmp/venv/bin/rapid-search" show "$tmp/quickstart.yaml"
say "ok: the wheel installs alone, its runtime works without extras, and its search writes a schedule"
