import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# what self-tuning measures goes to a folder of this test session, not the user's cache (subprocesses inherit it)
os.environ.setdefault("LP_CACHE_DIR", tempfile.mkdtemp(prefix="lp-test-cache-"))
torch.set_num_threads(1)  # tests run beside other processes on 2 cores; oversubscription makes them crawl
sys.path.insert(0, str(Path(__file__).resolve().parent))
