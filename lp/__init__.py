"""lp: exact lookahead decoding of Hugging Face LLMs, with lookahead parallelism across ranks."""
import os

# Read before the slow imports below (torch, transformers: seconds), so that a rank whose launcher dies while it
# is still importing notices it too (lp.distributed.bootstrap.watch_launcher).
STARTED_BY = os.getppid()

from .auto_tune import AutoDecoder
from .config import ConfigError, LookaheadConfig
from .decoding import Decoder, GenerationResult, PromptError, generate, stream
from .greedy_rules import UnsupportedGenerationSetting

__all__ = ["AutoDecoder", "ConfigError", "Decoder", "GenerationResult", "LookaheadConfig", "PromptError",
           "UnsupportedGenerationSetting", "generate", "stream"]
__version__ = "0.1.0"
