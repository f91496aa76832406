"""dsv4 ops: one module per op family (reference + CUDA kernel behind one torch.ops.dsv4 name).

Importing this package loads ``dsv4._C`` (the compiled kernels, if built) and registers the
reference and fake implementation of every ``torch.ops.dsv4`` op.
"""

from . import _ext  # noqa: F401  (loads dsv4._C first)
from . import norm  # noqa: F401
from . import indexer  # noqa: F401
from . import compressor  # noqa: F401
from . import attention  # noqa: F401
from . import hca_attn  # noqa: F401
from . import kv_cache  # noqa: F401
from . import qkv_rope  # noqa: F401
from . import moe  # noqa: F401
from . import mhc  # noqa: F401
from . import grouped_gemm  # noqa: F401
from . import gemm  # noqa: F401
from . import grouped_oproj  # noqa: F401
from . import sampling  # noqa: F401
from . import paged  # noqa: F401
