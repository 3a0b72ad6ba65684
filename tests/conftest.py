import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tests run beside other processes on 2 cores; oversubscription makes them crawl
sys.path.insert(0, str(Path(__file__).resolve().parent))
