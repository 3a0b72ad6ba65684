#!/usr/bin/env bash
# Lookahead parallelism under MPI: mpirun starts the ranks; lp reads rank and size from mpi4py, and rank 0
# picks a free loopback port and broadcasts MASTER_ADDR/MASTER_PORT to the others (mpi4py bcast).
#   launch/mpirun_example.sh                                   # 2 ranks, the embedded model, built-in prompts
#   NP=4 launch/mpirun_example.sh --prompt "def fib(n):" --compare-greedy
# Needs: pip install 'lp[mpi]' (mpi4py + the mpich wheel, which provides mpirun).
# Several hosts: loopback no longer reaches every rank, so name rank 0's host yourself, e.g. with MPICH
#   mpirun -np 8 -hosts node1,node2 -genv MASTER_ADDR node1 python3 launch/run.py --config ...
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-2}
MPIRUN=${MPIRUN:-$(command -v mpirun || command -v mpiexec || true)}
if [ -z "$MPIRUN" ]; then
    echo "mpirun_example.sh: no mpirun or mpiexec on PATH; pip install 'lp[mpi]'" >&2
    exit 2
fi
exec "$MPIRUN" -np "$NP" "${PYTHON:-python3}" launch/run.py "$@"
