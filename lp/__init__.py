"""lp: exact lookahead decoding of Hugging Face LLMs, with lookahead parallelism across ranks."""
from .config import ConfigError, LookaheadConfig
from .decoding import Decoder, GenerationResult, PromptError, generate, stream
from .greedy_rules import UnsupportedGenerationSetting

__all__ = ["ConfigError", "Decoder", "GenerationResult", "LookaheadConfig", "PromptError",
           "UnsupportedGenerationSetting", "generate", "stream"]
__version__ = "0.1.0"
