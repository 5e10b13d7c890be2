#!/usr/bin/env bash
# Wheels for the Python packages benchmarks/gpu_checks.sh needs and the GPU host lacks (it has no
# network): today only duckdb, for the build benchmark. Run here, where pip reaches the registry;
# then name .whl in the device tool's carry: run(command="bash benchmarks/gpu_checks.sh",
# carry=[".whl"], timeout_s=540). .whl/ is ignored by git. The host's python is 3.12, x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
version=$("$PY" -c "import duckdb; print(duckdb.__version__)" 2>/dev/null || echo "${DUCKDB_VERSION:-2.0.0}")
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "duckdb==$version"
ls -l .whl
