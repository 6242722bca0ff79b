"""stego_core: the logic of the STEGO study; notebooks and the book only call into it."""
from .config import StegoError

__all__ = ["StegoError"]
__version__ = "0.1.0"
