#!/usr/bin/env bash
# The wheels the GPU runs carry in .whl/ (git-ignored; name it in the device run's `carry`):
# the shared wheelhouse (server stack, the pinned transformers), plus what it leaves out and the
# served benchmarks need to measure what a user gets: httptools (uvicorn's C HTTP parser, a hallm
# dependency: without it uvicorn falls back to the pure-Python h11), uvloop, the benchmark
# client's aiohttp, and py-spy for `gpu_served.py --py-spy`. Versions from requirements/constraints.txt.
#
#   tests/gpu/wheelhouse.sh [DIR]        (from the repository root; DIR defaults to .whl)
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.whl}
../shared/tools/gpu-wheelhouse.sh "$dir"
pip download -q --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any \
  -c requirements/constraints.txt -d "$dir" httptools uvloop aiohttp py-spy==0.4.3
du -sh "$dir"
