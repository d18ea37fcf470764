"""Text generation on top of models/: the fast decoding loop (decoder.py) and text streaming (streaming.py)."""
from .decoder import Decoder, pad_left
from .streaming import TextStream, generate_text

__all__ = ["Decoder", "pad_left", "TextStream", "generate_text"]
