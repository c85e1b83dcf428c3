#!/usr/bin/env bash
# Times the Keras LSTM example (seed 004) on this machine; see keras_lstm.py.
# Uses the TensorFlow environment of ../shared/bench/run_tf_tutorial.sh (TF_BENCH_VENV, default
# $TMPDIR/tf-bench-venv), creating it on first use: tensorflow-cpu, outside the project.
set -e
here=$(cd "$(dirname "$0")" && pwd)
venv=${TF_BENCH_VENV:-$(python3 -c "import tempfile; print(tempfile.gettempdir())")/tf-bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q tensorflow-cpu numpy
fi
exec "$venv/bin/python" "$here/keras_lstm.py" "$@"
