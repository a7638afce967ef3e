#!/usr/bin/env bash
# N local processes x K simulated CPU devices as one JAX job; see launch/local.py --help.
#   launch/local.sh --num_processes=2 --devices_per_process=4 -- --config=configs/clip.py:tiny --workdir=/tmp/run
# Uses $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" "$REPO/launch/local.py" "$@"
