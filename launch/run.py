"""Entry point for every launcher: python, torchrun, mpirun, srun, deepspeed (see lp/cli/main.py and --help)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
