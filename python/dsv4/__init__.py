"""dsv4: DeepSeek-V4 (Flash / Pro) kernels and a pure-PyTorch reference model.

Public API: :class:`ModelConfig`, :class:`Model`, :class:`Cache`, :func:`info`,
:func:`set_backend` / :func:`get_backend` (CUDA kernels or the pure-PyTorch reference),
:func:`allow_unverified_kernels` (kernels not yet verified on a GPU; see dsv4.ops.backend).
"""

__version__ = "0.1.0"

from .config import ConfigError, ModelConfig
from .cache import Cache
from .model import Model
from .ops._ext import info
from .ops.backend import allow_unverified_kernels, get_backend, set_backend

__all__ = ["ModelConfig", "ConfigError", "Model", "Cache", "info", "set_backend", "get_backend",
           "allow_unverified_kernels", "__version__"]
