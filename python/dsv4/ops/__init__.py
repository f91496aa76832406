"""dsv4 ops: one module per op family (reference + CUDA kernel behind one torch.ops.dsv4 name)."""

from . import _ext  # noqa: F401  (loads dsv4._C and registers every torch.ops.dsv4 op)
