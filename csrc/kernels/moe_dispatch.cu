// dsv4 MoE dispatch: the stable expert-major permutation of the (token, slot) pairs, with
// per-expert offsets, computed on the device. Contract: include/dsv4/moe_routing.h; semantics:
// python/dsv4/ops/moe.py (moe_dispatch_reference).
//
// Pair p (= token p / topk, slot p % topk) goes to bucket b = its expert, or b = experts for an
// invalid index; positions are assigned bucket by bucket, and within a bucket in pair order (a
// stable counting sort). The pairs are cut into tiles of 1024 (256 threads, 8 warps of 128
// consecutive pairs). Inside a tile, a warp ranks its pairs 32 at a time: __match_any_sync
// groups the lanes of equal bucket, a lane's rank is the number of lower lanes in its group plus
// the warp's running count of that bucket (shared memory, updated by the group's lowest lane).
// An exclusive scan over the warps then gives each pair its rank inside the tile. No atomics
// decide an order, so the result is deterministic.
//
// One tile (pairs <= 1024, i.e. decode): one kernel does everything. More tiles: (1) per-tile
// bucket counts, (2) one CTA turns them into per-tile bases and the bucket starts (= expert
// offsets), (3) per-tile ranking and scatter.
#include "dsv4/moe_routing.h"

#include <climits>
#include <cstdint>
#include <cuda_runtime.h>

namespace dsv4 {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 4;                       // 32-pair rounds per warp
constexpr int kTile = kThreads * kRounds;        // 1024 pairs
constexpr int kMaxBuckets = static_cast<int>(kMoeDispatchMaxExperts) + 1;  // 1024

__device__ __forceinline__ int bucket_of(const int32_t* indices, int p, int experts) {
  const int e = indices[p];
  return (e >= 0 && e < experts) ? e : experts;
}

// Exclusive scan of vals[0, n) in place (shared memory), n <= blockDim.x * per-thread chunk.
// Every thread of the block must call it. Returns the total.
__device__ int block_exclusive_scan(int* vals, int n) {
  __shared__ int warp_sums[32];
  __shared__ int total;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int begin = tid * per;
  const int end = min(begin + per, n);
  int local = 0;
  for (int i = begin; i < end; ++i) local += vals[i];
  int incl = local;  // inclusive scan of `local` over the warp
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x >> 5;
    int w = lane < n_warps ? warp_sums[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += o;
    }
    if (lane < n_warps) warp_sums[lane] = wincl - w;  // exclusive warp prefix
    if (lane == 31) total = wincl;
  }
  __syncthreads();
  int run = warp_sums[warp] + incl - local;
  for (int i = begin; i < end; ++i) {
    const int v = vals[i];
    vals[i] = run;
    run += v;
  }
  __syncthreads();
  return total;
}

// Ranks the pairs of tile `tile` inside their warp. On return (after a __syncthreads),
// wcnt[w * nb + b] holds the number of bucket-b pairs of the warps before w in this tile
// (exclusive prefix over warps) and tile_count[b] (if not null) the tile's count of bucket b.
// bucket[r] / rank[r]: this lane's pair of round r (bucket -1 past the end).
__device__ void rank_tile(const int32_t* indices, int pairs, int experts, int tile, int* wcnt,
                          int* tile_count, int (&bucket)[kRounds], int (&rank)[kRounds]) {
  const int nb = experts + 1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < kWarps * nb; i += kThreads) wcnt[i] = 0;
  __syncthreads();
  int* mine = wcnt + warp * nb;
  const unsigned lower = (1u << lane) - 1u;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int p = tile * kTile + warp * (32 * kRounds) + r * 32 + lane;
    const int b = p < pairs ? bucket_of(indices, p, experts) : -1;
    const unsigned group = __match_any_sync(0xffffffffu, b);
    int base = 0;
    if (b >= 0) base = mine[b];
    __syncwarp();
    if (b >= 0 && (group & lower) == 0) mine[b] = base + __popc(group);  // lowest lane updates
    __syncwarp();
    bucket[r] = b;
    rank[r] = base + __popc(group & lower);
  }
  __syncthreads();
  for (int b = tid; b < nb; b += kThreads) {
    int run = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = wcnt[w * nb + b];
      wcnt[w * nb + b] = run;
      run += c;
    }
    if (tile_count != nullptr) tile_count[b] = run;
  }
  __syncthreads();
}

__device__ __forceinline__ void scatter(const float* weights, int32_t* row_ids,
                                        float* route_weight, int32_t* pair_pos, int p, int pos,
                                        bool valid, int topk) {
  row_ids[pos] = p / topk;
  route_weight[pos] = valid ? weights[p] : 0.f;
  pair_pos[p] = valid ? pos : -1;
}

// pairs <= kTile: everything in one CTA.
__global__ void __launch_bounds__(kThreads)
    dispatch_single_kernel(const int32_t* indices, const float* weights, int32_t* row_ids,
                           int32_t* expert_offsets, float* route_weight, int32_t* pair_pos,
                           int pairs, int topk, int experts) {
  __shared__ int wcnt[kWarps * kMaxBuckets];
  __shared__ int start[kMaxBuckets];
  const int nb = experts + 1;
  int bucket[kRounds], rank[kRounds];
  rank_tile(indices, pairs, experts, 0, wcnt, start, bucket, rank);
  block_exclusive_scan(start, nb);
  for (int b = threadIdx.x; b < nb; b += kThreads) expert_offsets[b] = start[b];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int b = bucket[r];
    if (b < 0) continue;
    const int p = warp * (32 * kRounds) + r * 32 + lane;
    scatter(weights, row_ids, route_weight, pair_pos, p, start[b] + wcnt[warp * nb + b] + rank[r],
            b < experts, topk);
  }
}

// Multi-tile step 1: hist[tile * nb + b] = number of bucket-b pairs in the tile.
__global__ void __launch_bounds__(kThreads)
    dispatch_count_kernel(const int32_t* indices, int pairs, int experts, int* hist) {
  __shared__ int cnt[kMaxBuckets];
  const int nb = experts + 1;
  for (int b = threadIdx.x; b < nb; b += kThreads) cnt[b] = 0;
  __syncthreads();
  const int tile = blockIdx.x;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int p = tile * kTile + r * kThreads + threadIdx.x;
    if (p < pairs) atomicAdd(&cnt[bucket_of(indices, p, experts)], 1);  // counts only
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nb; b += kThreads) hist[static_cast<int64_t>(tile) * nb + b] = cnt[b];
}

// Multi-tile step 2 (one CTA of kMaxBuckets threads, thread b = bucket b): hist becomes the
// per-tile base of each bucket (exclusive prefix over tiles), start[b] the bucket start.
__global__ void __launch_bounds__(kMaxBuckets)
    dispatch_scan_kernel(int* hist, int* start, int32_t* expert_offsets, int n_tiles,
                         int experts) {
  __shared__ int totals[kMaxBuckets];
  const int nb = experts + 1;
  const int b = threadIdx.x;
  int run = 0;
  if (b < nb) {
    constexpr int kBatch = 8;  // independent loads in flight (the running sum is serial)
    for (int t0 = 0; t0 < n_tiles; t0 += kBatch) {
      int c[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        c[i] = t0 + i < n_tiles ? hist[static_cast<int64_t>(t0 + i) * nb + b] : 0;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        if (t0 + i < n_tiles) hist[static_cast<int64_t>(t0 + i) * nb + b] = run;
        run += c[i];
      }
    }
    totals[b] = run;
  }
  __syncthreads();
  block_exclusive_scan(totals, nb);
  if (b < nb) {
    start[b] = totals[b];
    expert_offsets[b] = totals[b];
  }
}

// Multi-tile step 3: rank inside the tile and scatter.
__global__ void __launch_bounds__(kThreads)
    dispatch_scatter_kernel(const int32_t* indices, const float* weights, const int* tile_base,
                            const int* start, int32_t* row_ids, float* route_weight,
                            int32_t* pair_pos, int pairs, int topk, int experts) {
  __shared__ int wcnt[kWarps * kMaxBuckets];
  const int nb = experts + 1;
  const int tile = blockIdx.x;
  int bucket[kRounds], rank[kRounds];
  rank_tile(indices, pairs, experts, tile, wcnt, nullptr, bucket, rank);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int* base = tile_base + static_cast<int64_t>(tile) * nb;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int b = bucket[r];
    if (b < 0) continue;
    const int p = tile * kTile + warp * (32 * kRounds) + r * 32 + lane;
    scatter(weights, row_ids, route_weight, pair_pos, p,
            start[b] + base[b] + wcnt[warp * nb + b] + rank[r], b < experts, topk);
  }
}

}  // namespace

size_t moe_dispatch_workspace_bytes(int64_t pairs, int64_t experts) {
  if (pairs <= kTile || experts < 1) return 0;
  const int64_t n_tiles = (pairs + kTile - 1) / kTile;
  return static_cast<size_t>((n_tiles + 1) * (experts + 1)) * sizeof(int);
}

cudaError_t moe_dispatch(const int32_t* indices, const float* weights, int32_t* row_ids,
                         int32_t* expert_offsets, float* route_weight, int32_t* pair_pos,
                         int64_t pairs, int64_t topk, int64_t experts, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  if (pairs < 0 || pairs >= INT_MAX || topk < 1 || pairs % topk != 0) return cudaErrorInvalidValue;
  if (experts < 1 || experts > kMoeDispatchMaxExperts) return cudaErrorInvalidValue;
  if (expert_offsets == nullptr) return cudaErrorInvalidValue;
  if (pairs == 0) {
    return cudaMemsetAsync(expert_offsets, 0, static_cast<size_t>(experts + 1) * sizeof(int32_t),
                           stream);
  }
  if (indices == nullptr || weights == nullptr || row_ids == nullptr ||
      route_weight == nullptr || pair_pos == nullptr)
    return cudaErrorInvalidValue;
  const int P = static_cast<int>(pairs), K = static_cast<int>(topk), E = static_cast<int>(experts);
  if (pairs <= kTile) {
    dispatch_single_kernel<<<1, kThreads, 0, stream>>>(indices, weights, row_ids, expert_offsets,
                                                       route_weight, pair_pos, P, K, E);
    return cudaGetLastError();
  }
  if (workspace == nullptr || workspace_bytes < moe_dispatch_workspace_bytes(pairs, experts))
    return cudaErrorInvalidValue;
  const int n_tiles = static_cast<int>((pairs + kTile - 1) / kTile);  // int64: P + 1023 > INT_MAX
  int* hist = static_cast<int*>(workspace);
  int* start = hist + static_cast<int64_t>(n_tiles) * (E + 1);
  dispatch_count_kernel<<<n_tiles, kThreads, 0, stream>>>(indices, P, E, hist);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dispatch_scan_kernel<<<1, kMaxBuckets, 0, stream>>>(hist, start, expert_offsets, n_tiles, E);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  dispatch_scatter_kernel<<<n_tiles, kThreads, 0, stream>>>(indices, weights, hist, start,
                                                            row_ids, route_weight, pair_pos, P,
                                                            K, E);
  return cudaGetLastError();
}

}  // namespace dsv4
