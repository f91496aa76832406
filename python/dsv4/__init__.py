"""dsv4: DeepSeek-V4 (Flash / Pro) kernels and a pure-PyTorch reference model.

Public API: :class:`ModelConfig`, :class:`Model`, :class:`Cache`, :func:`info`.
"""

__version__ = "0.1.0"

from .config import ConfigError, ModelConfig
from .cache import Cache
from .model import Model
from .ops._ext import info

__all__ = ["ModelConfig", "ConfigError", "Model", "Cache", "info", "__version__"]
