#!/usr/bin/env bash
# Run training.ipynb under nbval in a private, empty working folder, so that nothing on this machine
# (the run `make demo` leaves in ./training_output, a ./tmp_training_output, a TRAINING_* variable)
# can change what the cells show. The committed outputs are compared with the sanitizers in
# tests/nbval_sanitize.cfg. Usage: tests/run_nbval.sh [PYTHON] [extra pytest arguments]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${1:-$repo/.venv/bin/python}"
shift || true
case "$python" in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac  # we cd below
work="$(mktemp -d "${TMPDIR:-/tmp}/training-nbval.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp "$repo/training.ipynb" "$repo/tests/nbval_sanitize.cfg" "$work/"
cd "$work"
# Only the test's own settings: every TRAINING_* variable of the caller is dropped.
unset $(env | sed -n 's/^\(TRAINING_[A-Za-z0-9_]*\)=.*/\1/p') 2>/dev/null || true
TRAINING_WORKSPACE=tmp_training_output TRAINING_FRESH_START=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
	"$python" -m pytest -q --nbval training.ipynb --nbval-sanitize-with nbval_sanitize.cfg \
	-p no:cacheprovider --rootdir "$work" "$@"
