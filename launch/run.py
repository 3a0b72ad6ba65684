"""Entry point for every launcher: python, torchrun, mpirun, srun, deepspeed (see lp/cli/main.py and --help)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# offline unless asked: a hub id not in the local cache is one error line at once (HF_HUB_OFFLINE=0 lets lp fetch it),
# not a minute of retries (read before transformers is imported)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
