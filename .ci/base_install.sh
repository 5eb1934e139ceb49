#!/usr/bin/env bash
# A base install (`pip install .`, no extras) runs the default job and one step of every method: optional
# dependencies (matplotlib, peft, bitsandbytes, submitit, scikit-learn) stay optional.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BASE_VENV:-/tmp/peftlab-base-venv}
OUT=$(mktemp -d)
python -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0   # first, so pip does not pull a CUDA build
"$VENV/bin/pip" install -q .
for extra in matplotlib peft bitsandbytes sklearn hydra_plugins.hydra_submitit_launcher; do
  if "$VENV/bin/python" -c "import $extra" 2>/dev/null; then echo "base install has optional $extra"; exit 1; fi
done
cd "$OUT"   # the installed package, not the checkout
run() { "$VENV/bin/python" "$OLDPWD/run_exp.py" wandb.mode=disabled "$@"; }
run hydra.run.dir="$OUT/default"
for method in $("$VENV/bin/python" -c "from peftlab.adapters import METHODS; print(' '.join(METHODS.names()))"); do
  run method="$method" train.max_steps=1 model.eval_epochs=0 hydra.run.dir="$OUT/$method"
  test -f "$OUT/$method/summary.json"
done
echo "base install: the default run and one step of every method passed"
