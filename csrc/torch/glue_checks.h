// Argument checks shared by the torch glue of the in-place ops (csrc/torch/*.cpp): every
// argument a schema marks as written (`Tensor(a!)`, `Tensor(b!)?`, ...) goes through
// check_not_broadcast before the op writes anything or launches a kernel, so a refused call
// leaves every buffer as it was. The CPU references refuse the same buffers
// (python/dsv4/ops/_ext.py check_writable).
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace dsv4 {

// A buffer written in place must give each element its own memory. A broadcast (`expand`ed)
// view has a dimension of size > 1 with stride 0: every token / row of it is one memory
// location, and the kernels' writes to it race (silently wrong, no error). Zero-size and
// size-1 dimensions with stride 0 are fine. `op` is the op's message prefix, ending in ": "
// (e.g. "dsv4::compress_kv (CUDA): "); `name` the schema's argument name.
inline void check_not_broadcast(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, name,
              " must not be broadcast (an expanded view whose elements share memory); pass a "
              "tensor with its own storage per element (e.g. .contiguous() or .clone()), got "
              "shape ", t.sizes(), " and strides ", t.strides());
}

// The same for an optional buffer (`Tensor(a!)?`): nothing to check when it is not given.
inline void check_not_broadcast(const std::optional<at::Tensor>& t, const char* op,
                                const char* name) {
  if (t.has_value()) check_not_broadcast(*t, op, name);
}

}  // namespace dsv4
