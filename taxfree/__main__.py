import sys

from taxfree.cli import main
from taxfree.distributed import discover_mpi
from taxfree.errors import TaxfreeError

# Under `mpirun ... python -m taxfree ...` each rank learns its place from MPI (mpi4py) before
# anything reads RANK / WORLD_SIZE; a no-op otherwise (taxfree.distributed).
try:
    discover_mpi()
except TaxfreeError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

sys.exit(main())
