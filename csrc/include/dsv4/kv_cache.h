// dsv4 KV cache formats shared by the kernels that write and read them (torch-free).
// The Python definition, pack / unpack references and allocation helpers are in
// python/dsv4/ops/kv_cache.py; the two must agree (tests/ops/test_kv_cache.py).
//
// A cache is a pool of blocks of `block_size` entries ("rows"). A dense per-sequence store is
// the same thing with one block per sequence (block_size = its capacity).
//
// * kPlain: entry = head_dim elements of bf16 (or fp32); element (blk, row, c) at
//   blk * block_stride + row * row_stride + c.
// * kFp8Model1 (FlashMLA "MODEL1_FP8Sparse", architecture.md §11.2; head_dim 512 = 448 nope
//   + 64 rope): 584 bytes per entry, laid out per block as
//       [block_size x 576 bytes: 448 e4m3 nope values | 64 bf16 rope values]
//       [block_size x 8 bytes:   7 UE8M0 scales (one per 64 nope dims) | 1 pad byte (0)]
//   at byte offset blk * block_stride (block_stride >= block_size * 584, a multiple of 16;
//   the allocation helper pads a block to a multiple of 576 bytes as FlashMLA does).
//   Value of nope dim c = e4m3[c] * 2^(scale[c / 64] - 127); the scales are those of
//   ops.quant.fp8_e4m3_sim (s = 2^ceil(log2(max(amax, 1e-4) / 448))), so a cache written
//   from a bf16 entry holds exactly fp8_e4m3_sim(entry[:448], 64) and entry[448:].
// * kFp8Indexer (DeepGEMM paged indexer-key layout; head_dim 64 or 128): d + 4 bytes per
//   entry (132 at d = 128), per block [block_size x d e4m3][block_size x fp32 scale];
//   value c = e4m3[c] * scale, scale = 2^ceil(log2(max(amax, 1e-4) / 448)) over the whole
//   entry (ops.quant.fp8_e4m3_sim with block d). The power-of-two scale keeps keys that are
//   already FP4-simulated (e2m1 values times power-of-two scales, §5) exact unless the block
//   scales of one key span more than 2^14.
// Non-finite values (both FP8 formats, csrc/kernels/fp8_block_quant.cuh): a block holding inf
// or NaN has scale 1 (byte 127 / 1.0f); in it NaN is the e4m3 code 0x7f / 0xff (its sign),
// +-inf is +-448 (0x7e / 0xfe), as the Python writer (ops.quant.fp8_e4m3_quantize).
#pragma once

#include <cstdint>

namespace dsv4 {

enum class CacheFormat : int32_t {
  kPlain = 0,
  kFp8Model1 = 1,
  kFp8Indexer = 2,
};

constexpr int kModel1HeadDim = 512;
constexpr int kModel1Nope = 448;
constexpr int kModel1Rope = 64;
constexpr int kModel1TokenBytes = 576;   // nope + rope part of one entry
constexpr int kModel1ScaleBytes = 8;     // 7 scales + 1 pad
constexpr int kModel1EntryBytes = 584;

// Bytes per entry of the indexer layout for head_dim d.
constexpr int fp8_indexer_entry_bytes(int d) { return d + 4; }

}  // namespace dsv4
