// Warp-specialised grouped GEMM variants with BF16 weights (kernel: grouped_gemm_ws.cuh).
#include "grouped_gemm_ws.cuh"

namespace dsv4 {
namespace gg {

template <int BN>
cudaError_t launch_ws_bn(const GroupedGemmArgs& a, int num_sms, cudaStream_t s) {
  if (a.epilogue == GemmEpilogue::kSwiGLU) return launch_ws_variant<kEpiSwiGLU, false, BN>(a, num_sms, s);
  if (a.positions != nullptr) return launch_ws_variant<kEpiStore, true, BN>(a, num_sms, s);
  return launch_ws_variant<kEpiStore, false, BN>(a, num_sms, s);
}

cudaError_t launch_ws_bf16(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s) {
  switch (tile) {
    case GemmTile::kLarge: return launch_ws_bn<128>(a, num_sms, s);
    case GemmTile::kHuge: return launch_ws_bn<256>(a, num_sms, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gg
}  // namespace dsv4
