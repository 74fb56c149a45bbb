#!/usr/bin/env bash
# Everything that needs a GPU, in one call (a device machine's time is scarce): the gpu-marked tests,
# the CUDA columns of the solver benchmark, the threaded-SciPy crossover on that machine's cores, and
# the connectivity/landscape benchmark on CUDA. Outputs go to $OUT (the device tool's folder) or
# ./gpu_out, one text file per step; paste the tables into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_session.sh            # needs torch with CUDA, scipy, numpy, pytest, hypothesis
#
# Then set AUTO_CUDA_MIN_BATCH / AUTO_CUDA_MAX_N in merging/solvers/_lap.py from the "CUDA/scipy" and
# "auto CUDA-in/scipy" columns (auto should pick the torch auction on CUDA only where it wins).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=python3
cores=$(nproc)
{ nvidia-smi; $py -c "import torch, scipy, numpy; print(torch.__version__, torch.version.cuda, scipy.__version__, numpy.__version__)"; } \
  > "$out/machine.txt" 2>&1
$py -m pytest -q -p no:cacheprovider -m gpu tests/merging tests/analysis > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" >> "$out/gpu_tests.txt"
$py benchmarks/bench_solvers.py --ns 64,256,1024 --Bs 1,16,128 --schedules "" --no-pot --threads "$cores" \
  > "$out/bench_solvers_cuda.txt" 2>&1
$py benchmarks/bench_solvers.py --ns 256 --Bs 16,128 --schedules fast,legacy --no-pot --threads "$cores" \
  > "$out/bench_schedules.txt" 2>&1
$py benchmarks/bench_solvers.py --crossover --threads "$cores" > "$out/crossover.txt" 2>&1
$py benchmarks/bench_connectivity.py --device cuda > "$out/bench_connectivity_cuda.txt" 2>&1
tail -n 3 "$out"/*.txt
