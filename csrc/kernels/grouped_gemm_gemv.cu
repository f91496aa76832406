// The weight-streaming GEMV tile of the grouped GEMM (GemmTile::kGemv): per-format
// instantiations of grouped_gemm_gemv.cuh, called from grouped_gemm.cu.
#include "grouped_gemm_gemv.cuh"

namespace dsv4 {
namespace gg {

bool gemv_supports(const GroupedGemmArgs& a) { return gemv::supports(a); }

cudaError_t launch_gemv(const GroupedGemmArgs& a, int num_sms, cudaStream_t s) {
  if (!gemv::supports(a)) return cudaErrorInvalidValue;
  const bool rope = a.positions != nullptr;
  if (a.w_format == GemmWeightFormat::kBF16) {
    return rope ? gemv::launch<kFmtBF16, true>(a, num_sms, s)
                : gemv::launch<kFmtBF16, false>(a, num_sms, s);
  }
  return rope ? gemv::launch<kFmtFP8, true>(a, num_sms, s)
              : gemv::launch<kFmtFP8, false>(a, num_sms, s);
}

}  // namespace gg
}  // namespace dsv4
