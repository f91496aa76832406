// The weight-streaming small-M tile of the grouped GEMM (GemmTile::kSkinny): per-format and
// per-epilogue instantiations of grouped_gemm_skinny.cuh, called from grouped_gemm.cu.
#include "grouped_gemm_skinny.cuh"

namespace dsv4 {
namespace gg {

cudaError_t launch_skinny(const GroupedGemmArgs& a, int num_sms, cudaStream_t s) {
  const bool swiglu = a.epilogue == GemmEpilogue::kSwiGLU, rope = a.positions != nullptr;
  switch (a.w_format) {
    case GemmWeightFormat::kBF16:
      if (swiglu) return skinny::launch<kFmtBF16, kEpiSwiGLU, false>(a, num_sms, s);
      return rope ? skinny::launch<kFmtBF16, kEpiStore, true>(a, num_sms, s)
                  : skinny::launch<kFmtBF16, kEpiStore, false>(a, num_sms, s);
    case GemmWeightFormat::kFP8:
      if (swiglu) return skinny::launch<kFmtFP8, kEpiSwiGLU, false>(a, num_sms, s);
      return rope ? skinny::launch<kFmtFP8, kEpiStore, true>(a, num_sms, s)
                  : skinny::launch<kFmtFP8, kEpiStore, false>(a, num_sms, s);
    case GemmWeightFormat::kFP4:  // no RoPE with FP4 weights (check_args)
      if (swiglu) return skinny::launch<kFmtFP4, kEpiSwiGLU, false>(a, num_sms, s);
      return skinny::launch<kFmtFP4, kEpiStore, false>(a, num_sms, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gg
}  // namespace dsv4
