#!/usr/bin/env bash
# The packaging check (`make wheel-check`): `python -m build` makes the sdist and, from it, the
# wheel; the wheel goes into a fresh virtual environment with constraints.txt (core dependencies
# only, no extras), where `qatkd --help` and a tiny `qatkd train` on Fashion-MNIST must work and
# the run must write metrics.json. Everything lives in one temporary folder, removed at the end
# (KEEP=1 keeps it, to look at after a failure).
#
#   PYTHON   the interpreter with the `build` package (the dev extra): default .venv/bin/python
#   KEEP=1   keep the temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
python=${PYTHON:-.venv/bin/python}
constraints=$repo/constraints.txt
fashion=/usr/share/datasets/fashion-mnist

fail() {
    echo "wheel-check FAILED: $*" >&2
    exit 1
}

[ -x "$python" ] || fail "no interpreter $python (run 'make setup', or set PYTHON)"
"$python" -c "import build" 2>/dev/null ||
    fail "$python lacks the 'build' package (pip install -c constraints.txt 'build')"
[ -f "$constraints" ] || fail "no $constraints"
[ -d "$fashion" ] || fail "no Fashion-MNIST in $fashion ('make data' installs dataset-fashion-mnist)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qatkd-wheel-check.XXXXXX")
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        echo "wheel-check: kept $tmp"
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
started=$SECONDS
step() { echo "wheel-check [$((SECONDS - started)) s]: $*"; }

step "python -m build (sdist, then the wheel from it) into $tmp/dist"
"$python" -m build --outdir "$tmp/dist" "$repo" >"$tmp/build.log" 2>&1 ||
    { tail -n 30 "$tmp/build.log" >&2; fail "python -m build (log above)"; }
wheels=("$tmp"/dist/qatkd-*.whl)
[ "${#wheels[@]}" = 1 ] && [ -f "${wheels[0]}" ] || fail "expected one wheel in $tmp/dist"
wheel=${wheels[0]}
sdists=("$tmp"/dist/qatkd-*.tar.gz)
[ -f "${sdists[0]}" ] || fail "no sdist in $tmp/dist"
step "built $(basename "$wheel") and $(basename "${sdists[0]}")"

step "fresh venv; pip install -c constraints.txt $(basename "$wheel")"
"$python" -m venv "$tmp/venv" || fail "python -m venv"
venv_py=$tmp/venv/bin/python
"$venv_py" -m pip install -q -c "$constraints" "$wheel" >"$tmp/pip.log" 2>&1 ||
    { grep -v "is ignored: it is neither" "$tmp/pip.log" | tail -n 30 >&2; fail "pip install of the wheel"; }
"$venv_py" -m pip check >"$tmp/check.log" 2>&1 ||
    { cat "$tmp/check.log" >&2; fail "pip check in the fresh venv"; }

# Outside the repository, so that nothing from the checkout can be imported instead.
cd "$tmp"
where=$("$venv_py" -c "import qatkd; print(qatkd.__file__)") || fail "import qatkd"
case $where in
    "$tmp/venv/"*) ;;
    *) fail "qatkd imported from $where, not from the fresh venv" ;;
esac

step "qatkd --help"
"$tmp/venv/bin/qatkd" --help >"$tmp/help.txt" 2>&1 || { cat "$tmp/help.txt" >&2; fail "qatkd --help"; }
grep -q "train" "$tmp/help.txt" || { cat "$tmp/help.txt" >&2; fail "qatkd --help lists no train"; }

step "qatkd train (resnet8, 256 samples, one epoch)"
"$tmp/venv/bin/qatkd" --quiet train model.name=resnet8 data.train_limit=256 data.test_limit=128 \
    train.epochs=1 train.batch_size=64 "out=$tmp/run" >"$tmp/train.log" 2>&1 ||
    { tail -n 30 "$tmp/train.log" >&2; fail "qatkd train (log above)"; }
[ -s "$tmp/run/metrics.json" ] || { cat "$tmp/train.log" >&2; fail "the run wrote no metrics.json"; }
"$venv_py" -c "import json, sys; json.load(open(sys.argv[1]))" "$tmp/run/metrics.json" ||
    fail "metrics.json is not JSON"
cat "$tmp/train.log"

step "passed: the wheel installs with constraints.txt and trains in a fresh venv"
