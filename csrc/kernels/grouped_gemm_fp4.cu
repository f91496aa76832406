// Grouped GEMM variants with FP4 weights (kernel: grouped_gemm.cuh). One file per weight
// format so that the variants compile in parallel.
#include "grouped_gemm.cuh"

namespace dsv4 {
namespace gg {

cudaError_t launch_fp4(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s) {
  if (a.epilogue == GemmEpilogue::kSwiGLU) {
    return launch_tile<kFmtFP4, kEpiSwiGLU, false>(a, tile, num_sms, s);
  }
  if (a.positions != nullptr) {
    return cudaErrorNotSupported;  // RoPE is for wo_a (bf16 or FP8)
  }
  return launch_tile<kFmtFP4, kEpiStore, false>(a, tile, num_sms, s);
}

}  // namespace gg
}  // namespace dsv4
