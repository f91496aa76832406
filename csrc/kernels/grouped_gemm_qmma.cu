// FP8 x FP8 grouped GEMM variants (kernel: grouped_gemm_qmma.cuh): FP8 / FP4 weights, SwiGLU /
// store epilogue, 16 / 64 / 128 activation rows per tile.
#include "grouped_gemm_qmma.cuh"

namespace dsv4 {
namespace gg {
namespace {

template <int WFMT, int EPI>
cudaError_t launch_rows(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s) {
  switch (tile) {
    case GemmTile::kDecode:
    case GemmTile::kDecodeDeep:
      return launch_qmma_variant<WFMT, EPI, 16>(a, num_sms, s);
    case GemmTile::kMedium:
      return launch_qmma_variant<WFMT, EPI, 64>(a, num_sms, s);
    case GemmTile::kLarge:
    case GemmTile::kHuge:
      return launch_qmma_variant<WFMT, EPI, 128>(a, num_sms, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_qmma(const GroupedGemmArgs& a, GemmTile tile, int num_sms, cudaStream_t s) {
  const bool swiglu = a.epilogue == GemmEpilogue::kSwiGLU;
  if (a.w_format == GemmWeightFormat::kFP8) {
    return swiglu ? launch_rows<kFmtFP8, kEpiSwiGLU>(a, tile, num_sms, s)
                  : launch_rows<kFmtFP8, kEpiStore>(a, tile, num_sms, s);
  }
  if (a.w_format == GemmWeightFormat::kFP4) {
    return swiglu ? launch_rows<kFmtFP4, kEpiSwiGLU>(a, tile, num_sms, s)
                  : launch_rows<kFmtFP4, kEpiStore>(a, tile, num_sms, s);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gg
}  // namespace dsv4
