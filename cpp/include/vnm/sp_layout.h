// The mma.sp kernel layout ("packed" form) and the PTX fragment facts it rests on.
//
// Everything here is a __host__ __device__ inline function (VNM_HD), compiled into the CUDA
// kernels AND into the CPU packing code and the CPU model of mma.sp (cpp/src/pack.cpp,
// cpp/src/mma_model.cpp). CI has no GPU: it runs the CPU model over the very index functions
// the kernels use, so a wrong mapping fails CI, not only a GPU test.
//
// ---- 1. PTX facts: mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16} ----
// (PTX ISA, "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16 types", section
// warp-level-matrix-fragment-sparse-mma-16832-f16bf16; lane = %laneid, g = lane >> 2 (groupID),
// t = lane & 3 (threadID_in_group).)
//  A (16 x 32, 2:4 along k, stored as 16 x 16): 4 .b32 registers = a0..a7 (low half first).
//      row(a_i)   = g          for i in {0,1,4,5},   g + 8 otherwise
//      chunk(a_i) = t          for i < 4,            t + 4 for i >= 4   (chunk = 4 columns of k)
//      a_i is the (i & 1)-th non-zero of its chunk (the one whose index sits in the low 2 bits
//      of the chunk's metadata nibble for i & 1 == 0, in bits 2-3 otherwise).
//  B (32 x 8): 4 .b32 registers = b0..b7: k(b_i) = 2t + (i & 1) + 8 (i >> 1), n(b_i) = g.
//  C/D (16 x 8 fp32): c0..c3: row = g + 8 (i >> 1), n = 2t + (i & 1).
//  Metadata e (.b32): with sparsity selector 0 (the only one used here; m16n8k32 f16/bf16
//      allows 0 and 1) lanes with t in {0, 1} supply it; lane (g, t) holds in bits [15:0] row g
//      and in bits [31:16] row g + 8, for chunks 4t .. 4t+3, chunk j of the four in nibble j
//      (bits 4j..4j+3). A nibble is (idx0 | idx1 << 2), the positions of the two non-zeros in
//      their chunk of 4; ::ordered_metadata requires idx0 < idx1. 0b0000, 0b0101, 0b1010 and
//      0b1111 are invalid (undefined behaviour), so padding uses 0b0100 (positions 0 and 1).
//  ldmatrix.sync.aligned.m8n8.x4.shared.b16 (no .trans): lanes 8m..8m+7 give the row addresses
//      of matrix m; lane l receives in register m the elements (row l >> 2, columns
//      2 (l & 3), 2 (l & 3) + 1) of matrix m.
// These were read from the PTX ISA text and cross-checked with two public users that ran them on
// GPUs (LLVM's mlir sparse-mma-2-4-f16.mlir integration test, whose expected output the CPU model
// reproduces in tests/test_mma_model.py, and Triton/XLA's SparseDot lowering for the metadata).
//
// ---- 2. The packed (kernel) layout, private to the kernels ------------------------------------
// Derived from the canonical storage of format.h by vnm::pack (CPU) / vnm::cuda::pack (GPU) and
// inverted by unpack. With R' padded rows, G groups, M the pattern's M:
//   MT = R' / 16 row tiles, KS = ceil(G / 8) k-steps (one k-step = 8 groups = the 32 logical
//   k of one mma.sp), Gp = 8 KS padded groups.
//   values_p  [MT][KS][32][8]  16-bit  lane l's 8 A elements a0..a7 of tile (mt, ks): ONE 16-byte
//                                      load per lane and fragment, 512 contiguous bytes a warp.
//                                      Groups >= G hold zeros.
//   meta_p    [MT][KS][16]     uint32  the metadata register of lane (g, t < 2) in word 2g + t.
//                                      Groups >= G hold 0x4 nibbles (valid, values are zero).
//   kidx      [KB][Gp][4]      int32   per column block (KB = R'/V, or 1 when M == 4: every
//                                      block selects columns 0..3) and group the x column each of
//                                      the 4 selected columns reads, with perm applied:
//                                      perm ? perm[c] : c for c = g M + columns[.][g][s] < K;
//                                      -1 - columns[.][g][s] for a column in the padding (c >= K)
//                                      or a padded group (which the kernels read as zero: x is
//                                      never read past K). 32 consecutive entries = one k-step,
//                                      in the order of B's k.
//   out_rows  [R]              int32   optional: the output row of each stored row (row_perm of
//                                      the VNMTensor), applied where the epilogue stores y.
// The non-negative entries hide perm; unpack restores columns from them with the inverse perm.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VNM_HD __host__ __device__ __forceinline__
#else
#define VNM_HD inline
#endif

namespace vnm::sp {

constexpr int kWarp = 32;
constexpr int kTileRows = 16;      // mma.sp M
constexpr int kTileTokens = 8;     // mma.sp N
constexpr int kStepK = 32;         // mma.sp K (logical, before compression)
constexpr int kStepGroups = 8;     // V:N:M groups per k-step (4 selected columns each)
constexpr uint32_t kPadNibble = 0x4;            // positions (0, 1): a valid nibble for zeros
constexpr uint32_t kPadMetaWord = 0x44444444u;  // 8 pad nibbles

// ---- PTX fragment ownership (section 1) ------------------------------------------------------

struct AElem {
  int row;    // 0..15
  int chunk;  // 0..7: the 4-wide chunk of k (= group within the k-step)
  int slot;   // 0 or 1: first or second non-zero of the chunk
};
VNM_HD AElem a_elem(int lane, int i) {
  return AElem{(lane >> 2) + 8 * ((i >> 1) & 1), (lane & 3) + 4 * (i >> 2), i & 1};
}

// Inverse of a_elem: the lane and element index that hold (row, chunk, slot).
VNM_HD int a_lane(int row, int chunk) { return 4 * (row & 7) + (chunk & 3); }
VNM_HD int a_index(int row, int chunk, int slot) { return slot + 2 * (row >> 3) + 4 * (chunk >> 2); }

struct BElem {
  int k;  // 0..31
  int n;  // 0..7
};
VNM_HD BElem b_elem(int lane, int i) {
  return BElem{2 * (lane & 3) + (i & 1) + 8 * (i >> 1), lane >> 2};
}

struct CElem {
  int row;  // 0..15
  int n;    // 0..7
};
VNM_HD CElem c_elem(int lane, int i) {
  return CElem{(lane >> 2) + 8 * (i >> 1), 2 * (lane & 3) + (i & 1)};
}

// Metadata (selector 0): whether a lane supplies it, and where a (row, chunk) nibble sits.
VNM_HD bool meta_supplier(int lane, int selector) { return ((lane & 3) >> 1) == selector; }
VNM_HD int meta_lane(int row, int chunk, int selector) {
  return 4 * (row & 7) + 2 * selector + (chunk >> 2);
}
VNM_HD int meta_shift(int row, int chunk) { return 16 * (row >> 3) + 4 * (chunk & 3); }

// The packed meta word a lane loads: word 2g + (t & 1). Lanes t = 2, 3 load their neighbour's
// word, which selector 0 ignores (one load instruction for the whole warp, no divergence).
VNM_HD int meta_word_of_lane(int lane) { return 2 * (lane >> 2) + (lane & 1); }

// ldmatrix .x4: (matrix, row) whose address lane l supplies, and what lane l receives.
VNM_HD int ldsm_matrix_of_lane(int lane) { return lane >> 3; }
VNM_HD int ldsm_row_of_lane(int lane) { return lane & 7; }

// ---- the packed layout (section 2) -----------------------------------------------------------

struct PackedGeom {
  int64_t R = 0, K = 0;   // logical shape
  int64_t M = 4;          // pattern M
  int64_t row_block = 0;  // V (16 for plain 2:4)
  int64_t Rp = 0;         // padded rows R'
  int64_t G = 0;          // groups per row
  int64_t MT = 0;         // row tiles: R' / 16
  int64_t KS = 0;         // k-steps: ceil(G / 8)
  int64_t Gp = 0;         // 8 KS
  int64_t KB = 0;         // column blocks in kidx: R' / V, or 1 when M == 4
  int64_t meta_cols = 0;  // canonical meta bytes per row: ceil(G / 2)

  VNM_HD int64_t values_count() const { return MT * KS * kWarp * 8; }
  VNM_HD int64_t meta_words() const { return MT * KS * 16; }
  VNM_HD int64_t kidx_count() const { return KB * Gp * 4; }
  // kidx column block of a row (all rows share block 0 when M == 4, or when R' <= V).
  VNM_HD int64_t kidx_block(int64_t row) const { return KB == 1 ? 0 : row / row_block; }
  // Whether every group keeps all its columns, so that kidx entry k of k-step ks is column
  // 32 ks + k (up to K) and B needs no gather: the pattern's M == 4, nothing else. KB == 1 is no
  // proxy for it: for M > 4 it also holds whenever R' <= V, and the kept columns still vary.
  VNM_HD bool keeps_every_column() const { return M == 4; }
};

// Element index in values_p of element i held by `lane` for tile (mt, ks).
VNM_HD int64_t packed_value_index(const PackedGeom& p, int64_t mt, int64_t ks, int lane, int i) {
  return ((mt * p.KS + ks) * kWarp + lane) * 8 + i;
}
VNM_HD int64_t packed_meta_index(const PackedGeom& p, int64_t mt, int64_t ks, int word) {
  return (mt * p.KS + ks) * 16 + word;
}
// First kidx entry of k-step ks in column block kb; entry k (0..31) follows, in B's k order.
VNM_HD int64_t kidx_step_index(const PackedGeom& p, int64_t kb, int64_t ks) {
  return (kb * p.Gp + ks * kStepGroups) * 4;
}

// canonical -> packed, one output element each (the GPU runs one thread per element).
VNM_HD uint16_t packed_value_at(const PackedGeom& p, const uint16_t* values, int64_t idx) {
  const int i = int(idx & 7);
  const int lane = int((idx >> 3) & 31);
  const int64_t tile = idx >> 8;  // mt * KS + ks
  const int64_t mt = tile / p.KS, ks = tile % p.KS;
  const AElem e = a_elem(lane, i);
  const int64_t row = mt * kTileRows + e.row;
  const int64_t group = ks * kStepGroups + e.chunk;
  return group < p.G ? values[(row * p.G + group) * 2 + e.slot] : uint16_t(0);
}

VNM_HD uint32_t canonical_nibble(const PackedGeom& p, const uint8_t* meta, int64_t row,
                                 int64_t group) {
  if (group >= p.G) return kPadNibble;
  return (meta[row * p.meta_cols + group / 2] >> (4 * (group & 1))) & 0xFu;
}

VNM_HD uint32_t packed_meta_at(const PackedGeom& p, const uint8_t* meta, int64_t idx) {
  const int word = int(idx & 15);
  const int64_t tile = idx >> 4;
  const int64_t mt = tile / p.KS, ks = tile % p.KS;
  const int g = word >> 1, half = word & 1;
  uint32_t out = 0;
  for (int hi = 0; hi < 2; ++hi) {
    const int row16 = g + 8 * hi;
    for (int j = 0; j < 4; ++j) {
      const int chunk = 4 * half + j;
      const uint32_t nib =
          canonical_nibble(p, meta, mt * kTileRows + row16, ks * kStepGroups + chunk);
      out |= nib << meta_shift(row16, chunk);
    }
  }
  return out;
}

VNM_HD int32_t packed_kidx_at(const PackedGeom& p, const uint8_t* columns, const int32_t* perm,
                              int64_t idx) {
  const int s = int(idx & 3);
  const int64_t group = (idx >> 2) % p.Gp;
  const int64_t kb = (idx >> 2) / p.Gp;
  if (group >= p.G) return -1 - s;  // padded group: values are zero, read nothing
  const int off = columns[(kb * p.G + group) * 4 + s];
  const int64_t c = group * p.M + off;
  if (c >= p.K) return -1 - off;    // column padding: never read x past K
  return perm ? perm[c] : int32_t(c);
}

// Output row of stored row r: out_rows (the VNMTensor's row_perm, R entries) scatters the rows
// back to the layer's output order in the epilogue; null keeps them in place. The bias is read
// at the output row (it is in the layer's order).
VNM_HD int64_t out_row(const int32_t* out_rows, int64_t r) { return out_rows ? out_rows[r] : r; }

// Where canonical value (row, group, slot) sits in values_p.
VNM_HD int64_t packed_value_of(const PackedGeom& p, int64_t row, int64_t group, int slot) {
  const int r16 = int(row % kTileRows), chunk = int(group % kStepGroups);
  return packed_value_index(p, row / kTileRows, group / kStepGroups, a_lane(r16, chunk),
                            a_index(r16, chunk, slot));
}

// packed -> canonical, one output element each.
VNM_HD uint16_t canonical_value_at(const PackedGeom& p, const uint16_t* values_p, int64_t idx) {
  return values_p[packed_value_of(p, (idx >> 1) / p.G, (idx >> 1) % p.G, int(idx & 1))];
}

VNM_HD uint32_t packed_nibble(const PackedGeom& p, const uint32_t* meta_p, int64_t row,
                              int64_t group) {
  const int64_t mt = row / kTileRows, ks = group / kStepGroups;
  const int r16 = int(row % kTileRows), chunk = int(group % kStepGroups);
  const uint32_t word =
      meta_p[packed_meta_index(p, mt, ks, 2 * (r16 & 7) + (chunk >> 2))];
  return (word >> meta_shift(r16, chunk)) & 0xFu;
}

VNM_HD uint8_t canonical_meta_at(const PackedGeom& p, const uint32_t* meta_p, int64_t idx) {
  const int64_t row = idx / p.meta_cols, byte = idx % p.meta_cols;
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    const int64_t group = 2 * byte + h;
    if (group < p.G) out |= packed_nibble(p, meta_p, row, group) << (4 * h);
  }
  return uint8_t(out);
}

// inv_perm: the inverse of perm (inv_perm[perm[c]] = c), or null without perm.
VNM_HD uint8_t canonical_column_at(const PackedGeom& p, const int32_t* kidx,
                                   const int32_t* inv_perm, int64_t idx) {
  const int s = int(idx & 3);
  const int64_t group = (idx >> 2) % p.G;
  const int64_t rb = (idx >> 2) / p.G;
  const int64_t kb = p.KB == 1 ? 0 : rb;
  const int32_t v = kidx[(kb * p.Gp + group) * 4 + s];
  if (v < 0) return uint8_t(-1 - v);
  const int64_t c = inv_perm ? int64_t(inv_perm[v]) : int64_t(v);
  return uint8_t(c - group * p.M);
}

// ---- tiled kernel (N > 32): CTA tile shapes and the index maps of its data movement ------------
//
// A CTA computes a BM x BN tile of y^T (BM weight rows x BN tokens) with WARPS_M x WARPS_N warps
// of WM x WN mma tiles (16 rows x 8 tokens each). Every operand reaches shared memory by 16-byte
// cp.async through a STAGES-deep pipeline; one stage holds KPS k-steps (one barrier per stage).
// Per k-step kk of a stage, shared memory holds (byte offsets from the stage base):
//   A     [MT_CTA][32 lanes][16 B]   the packed values, one 16-byte fragment per lane
//   meta  [MT_CTA][16 words]         the packed metadata words
//   B     contiguous path (M == 4, no perm, x as torch stores it): [BN tokens][32 k], 64 B a
//         token, chunks swizzled (bs_offset), read by ldmatrix;
//         gathered path (x^T, K x ldb k-major): [32 k][BN tokens], the kept row kidx[k] of x^T,
//         token chunks swizzled by k (bt_offset), read by ldmatrix .trans.
// Rows past the last row tile copy the last tile (valid metadata; never stored), so the MMAs
// run unpredicated; a k-step past KS (KS not a multiple of KPS) gets zero A and B and the
// metadata of the stage's first k-step, which adds exactly zero.
template <int WM_, int WN_, int WARPS_M_, int WARPS_N_, int STAGES_ = 3, int KPS_ = 2>
struct TileShape {
  static constexpr int WM = WM_, WN = WN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_, KPS = KPS_;
  static constexpr int BM = kTileRows * WM * WARPS_M;
  static constexpr int BN = kTileTokens * WN * WARPS_N;
  static constexpr int THREADS = kWarp * WARPS_M * WARPS_N;
  static constexpr int MT_CTA = BM / kTileRows;
  static_assert(THREADS == 128, "the copy maps below assume 4 warps");
  static_assert(BN % 128 == 0, "gathered B: 16 threads a row, BN / 128 chunks each");

  static constexpr int A_STEP = MT_CTA * kWarp * 16;  // bytes per k-step
  static constexpr int META_STEP = MT_CTA * 64;
  static constexpr int B_STEP = kStepK * BN * 2;
  static constexpr int A_OFF = 0;
  static constexpr int META_OFF = A_OFF + KPS * A_STEP;
  static constexpr int B_OFF = META_OFF + KPS * META_STEP;
  static constexpr int STAGE_BYTES = B_OFF + KPS * B_STEP;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int C_PITCH = BM + 8;  // epilogue tile [BN][C_PITCH] 16-bit
  static constexpr int EPI_BYTES = BN * C_PITCH * 2;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(STAGE_BYTES % 128 == 0, "stage bases keep the B swizzle on 128-byte bank rows");

  // 16-byte copies per thread and k-step.
  static constexpr int A_COPIES = (MT_CTA * kWarp + THREADS - 1) / THREADS;
  // Metadata of a whole stage (KPS k-steps): threads tid < META_CHUNKS copy one chunk each, one
  // copy instruction per stage.
  static constexpr int META_CHUNKS = KPS * MT_CTA * 4;
  static_assert(META_CHUNKS <= THREADS, "one metadata chunk per thread at most");
  static constexpr int BC_COPIES = BN * 4 / THREADS;  // contiguous B
  static constexpr int BG_ROWS = 4;                    // gathered B: rows (k) per thread
  static constexpr int BG_CHUNKS = BN / 128;           // gathered B: chunks per row per thread
  static constexpr int EPI_CHUNKS = BN * BM / 8;       // 16-byte output chunks
};

// The curated configurations (cuda/src/spmm.cu dispatches, cpp/src/tiled_model.cpp emulates).
using TileM128 = TileShape<4, 8, 2, 2>;  // 128 x 128, warp 64 x 64: M == 4, or V % 128 == 0
using TileM64 = TileShape<4, 8, 1, 4>;   // 64 x 256, warp 64 x 64: V % 128 == 64
using TileM32 = TileShape<2, 8, 1, 4>;   // 32 x 256, warp 32 x 64: V % 64 == 32
using TileM16 = TileShape<1, 8, 1, 4>;   // 16 x 256, warp 16 x 64: V % 32 == 16

// Byte offsets within a stage.
template <class S>
VNM_HD int tile_a_offset(int kk, int mt_local, int lane) {
  return S::A_OFF + kk * S::A_STEP + mt_local * (kWarp * 16) + lane * 16;
}
template <class S>
VNM_HD int tile_meta_offset(int kk, int mt_local, int word) {
  return S::META_OFF + kk * S::META_STEP + mt_local * 64 + word * 4;
}

// Contiguous B tile [token][32 k], 64 bytes a token, its four 16-byte chunks XOR-swizzled by
// (token >> 1) & 3 so that ldmatrix's 8 row reads (8 tokens, one chunk) hit 8 distinct 16-byte
// bank groups. Element offset.
VNM_HD int bs_offset(int n, int k) {
  return n * kStepK + ((((k >> 3) ^ (n >> 1)) & 3) << 3) + (k & 7);
}
// Row address lane l supplies to ldmatrix .x4 for the 8 tokens from nb: matrix m = k chunk m,
// row r = token nb + r; register m then holds b_{2m}, b_{2m+1} of the B fragment.
VNM_HD int bs_ldsm_offset(int lane, int nb) {
  return bs_offset(nb + ldsm_row_of_lane(lane), 8 * ldsm_matrix_of_lane(lane));
}

// Gathered B tile [32 k][BN tokens]: row k holds the kept row kidx[k] of x^T. Token chunk c of
// row k sits at chunk c ^ (k & 7) so that ldmatrix .trans's 8 row reads (k = 8m .. 8m + 7, one
// token chunk) hit 8 distinct 16-byte bank groups. Element offset.
template <int BN>
VNM_HD int bt_offset(int k, int n) {
  return k * BN + ((((n >> 3) ^ k) & 7) << 3) + ((n >> 3) & ~7) * 8 + (n & 7);
}
// ldmatrix .x4 .trans for the B fragment of the 8 tokens from nb: matrix m = k rows 8m .. 8m+7,
// lane l supplies row k = l (= 8 (l >> 3) + (l & 7)); with .trans lane l receives in register m
// the elements (k = 8m + 2 (l & 3) + {0, 1}, token nb + (l >> 2)): b_{2m}, b_{2m+1}.
template <int BN>
VNM_HD int bt_ldsm_offset(int lane, int nb) {
  return bt_offset<BN>(8 * ldsm_matrix_of_lane(lane) + ldsm_row_of_lane(lane), nb);
}

// Copy maps: the j-th copy of thread tid in one k-step.
struct ACopy {
  int mt_local, lane;
};
template <class S>
VNM_HD ACopy a_copy(int tid, int j) {
  const int id = tid + j * S::THREADS;
  return ACopy{id >> 5, id & 31};
}
// Metadata copy of thread tid < META_CHUNKS: k-step kk of the stage, tile, words 4 quarter .. +3.
template <class S>
VNM_HD int meta_copy_kstep(int tid) { return tid / (S::MT_CTA * 4); }
template <class S>
VNM_HD int meta_copy_tile(int tid) { return (tid % (S::MT_CTA * 4)) >> 2; }
VNM_HD int meta_copy_quarter(int tid) { return tid & 3; }
// Contiguous B: token (in the CTA tile) and first k of copy j.
template <class S>
VNM_HD int bc_copy_token(int tid, int j) { return (tid >> 2) + j * (S::THREADS / 4); }
VNM_HD int bc_copy_k(int tid) { return 8 * (tid & 3); }
// Gathered B: rows k = bg_copy_row0(tid) + r (r < 4, one 16-byte kidx load), token chunks
// bg_copy_chunk(tid, u) (u < BN / 128): 16 threads cover a row, a warp two rows.
VNM_HD int bg_copy_row0(int tid) { return 4 * (tid >> 4); }
VNM_HD int bg_copy_chunk(int tid, int u) { return (tid & 15) + 16 * u; }
// Epilogue: 16-byte output chunk e = 8 consecutive rows of one token.
template <class S>
VNM_HD int epi_token(int e) { return e / (S::BM / 8); }
template <class S>
VNM_HD int epi_row(int e) { return 8 * (e % (S::BM / 8)); }

// Pitch (tokens) of the k-major copy of x the gathered path reads: a multiple of 8, so every
// 16-byte token chunk lies inside a row; columns past n_tokens are read only for outputs that
// are never stored.
inline int64_t transposed_x_pitch(int64_t n_tokens) { return (n_tokens + 7) / 8 * 8; }
// ---- decode kernel (N <= 32): work split and shared-memory map -----------------------------
//
// A decode CTA has kDecodeWarps warps. Its rows share one kidx column block, so the CTA gathers
// x for its tokens and k-range ONCE into shared memory, already in mma.sp B-fragment order, and
// every warp reads a B fragment with one 16-byte shared load. The CTA covers `wt` row tiles
// (warps along rows, wt = 4 when V % 64 == 0 or M == 4, 2 when V % 32 == 0, else 1) and splits
// its k-range among `kparts` = kDecodeWarps / wt warps along k (reduced in shared memory, in
// warp order). Across CTAs the k-steps are split `splits` ways (grid.y): each split writes fp32
// partials to a workspace [splits][N][R] and a second kernel adds them in split order, so the
// result is deterministic (no atomics) and does not depend on the device: the plan is a pure
// function of the shape (kDecodeTargetCtas is fixed, not the device's SM count).
// Weights stream through a kDecodeStages-deep cp.async pipeline per warp (each warp copies and
// reads only its own stages: no CTA barrier in the main loop), kDecodeStepsPerStage k-steps per
// stage (the loop is unrolled by that much).
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * kWarp;
constexpr int kDecodeStages = 4;
constexpr int kDecodeStepsPerStage = 2;
// 4 CTAs per SM of a 132-SM H100 (4.9 on a 108-SM A100): each warp keeps up to 3 stages x 2
// k-steps x 576 B = 3.4 KB of weights in flight, 4 CTAs x 4 warps = 55 KB per SM.
constexpr int64_t kDecodeTargetCtas = 528;
constexpr int kDecodeMaxBBytes = 32768;  // gathered B per CTA (bounds its k-range)
constexpr int64_t kDecodeMinUnits = 2;   // k-range units (kparts x steps per stage) per CTA
// Per k-step and warp in a pipeline stage: each lane's A fragment (16 B) and its own copy of
// the metadata word it passes to mma.sp (4 B: lanes read only what they copied, so the main
// loop needs no warp barrier).
constexpr int kDecodeStepBytes = kWarp * (16 + 4);

struct DecodePlan {
  int nt = 0;           // n8 token tiles per CTA: 1, 2 or 4 (N <= 8, 16, larger)
  int wt = 0;           // row tiles (warps along rows) per CTA: 4, 2 or 1
  int kparts = 0;       // warps along k per row tile: kDecodeWarps / wt
  int64_t row_ctas = 0, splits = 0, token_ctas = 0;  // grid x, y, z
  int64_t ks_cta = 0;   // k-steps per CTA: a multiple of kparts * kDecodeStepsPerStage
  int64_t ks_warp = 0;  // k-steps per warp: ks_cta / kparts (a multiple of the steps per stage)
  // Dynamic shared memory: A stages, metadata stages (kDecodeStepBytes a step), then B.
  VNM_HD int64_t pipe_bytes() const {
    return int64_t(kDecodeStages) * kDecodeWarps * kDecodeStepsPerStage * (kWarp * (16 + 4));
  }
  VNM_HD int64_t b_bytes() const { return ks_cta * nt * kWarp * 16; }
  VNM_HD int64_t smem_bytes() const { return pipe_bytes() + b_bytes(); }
  // fp32 partials of the cross-CTA split-K (0 when splits == 1).
  VNM_HD int64_t workspace_floats(int64_t n_tokens, int64_t R) const {
    return splits > 1 ? splits * n_tokens * R : 0;
  }
};

// splits_override > 0 forces the number of k splits (tests), clamped to what the k-steps and the
// shared-memory bound allow.
inline DecodePlan decode_plan(const PackedGeom& p, int64_t n_tokens, int64_t splits_override = 0) {
  DecodePlan d;
  d.nt = n_tokens <= kTileTokens ? 1 : n_tokens <= 2 * kTileTokens ? 2 : 4;
  d.wt = (p.KB == 1 || p.row_block % 64 == 0) ? 4 : p.row_block % 32 == 0 ? 2 : 1;
  d.kparts = kDecodeWarps / d.wt;
  d.row_ctas = (p.MT + d.wt - 1) / d.wt;
  d.token_ctas = (n_tokens + d.nt * kTileTokens - 1) / (d.nt * kTileTokens);
  const int64_t unit = int64_t(d.kparts) * kDecodeStepsPerStage;
  const int64_t units_total = (p.KS + unit - 1) / unit;
  // At least kDecodeMinUnits units per CTA (when K has them): the gather, the barrier and the
  // partials are paid once per CTA.
  const int64_t splits_max = (units_total + kDecodeMinUnits - 1) / kDecodeMinUnits;
  int64_t units_max = kDecodeMaxBBytes / (int64_t(d.nt) * kWarp * 16) / unit;  // per CTA
  if (units_max < 1) units_max = 1;
  const int64_t splits_min = (units_total + units_max - 1) / units_max;
  const int64_t ctas = d.row_ctas * (d.token_ctas > 0 ? d.token_ctas : 1);
  int64_t splits = splits_override > 0 ? splits_override : (kDecodeTargetCtas + ctas - 1) / ctas;
  if (splits > splits_max) splits = splits_max;
  if (splits < splits_min) splits = splits_min;
  if (splits < 1) splits = 1;
  const int64_t units_cta = (units_total + splits - 1) / splits;
  d.ks_cta = units_cta * unit;
  d.splits = (units_total + units_cta - 1) / units_cta;  // no empty split
  d.ks_warp = d.ks_cta / d.kparts;
  return d;
}

// Shared memory of a decode CTA, byte offsets (the kernel and its CPU emulation address it only
// through these): the A stages, the metadata stages, then the gathered B; after the main loop the
// start of it is reused for the reduction along k.
constexpr int kDecodeAStageBytes = kDecodeWarps * kDecodeStepsPerStage * kWarp * 16;
constexpr int kDecodeMetaBase = kDecodeStages * kDecodeAStageBytes;
constexpr int kDecodePipeBytes = kDecodeStages * kDecodeWarps * kDecodeStepsPerStage * kDecodeStepBytes;
// Lane `lane`'s 16-byte A fragment of k-step `step` of pipeline slot `stage`, for warp `warp`.
VNM_HD constexpr int decode_a_byte(int stage, int warp, int step, int lane) {
  return (((stage * kDecodeWarps + warp) * kDecodeStepsPerStage + step) * kWarp + lane) * 16;
}
// Lane `lane`'s own copy of its metadata word (meta_word_of_lane) for the same k-step.
VNM_HD constexpr int decode_meta_byte(int stage, int warp, int step, int lane) {
  return kDecodeMetaBase +
         (((stage * kDecodeWarps + warp) * kDecodeStepsPerStage + step) * kWarp + lane) * 4;
}
// Register r of lane `lane`'s B fragment, token tile j, local k-step kl (nt token tiles). The
// gather's thread tid writes r = tid & 3 of lane tid >> 2: 128 consecutive words per (kl, j),
// and the main loop reads a lane's 4 registers with one 16-byte load: both conflict-free.
VNM_HD constexpr int decode_b_byte(int nt, int kl, int j, int lane, int r) {
  return kDecodePipeBytes + (((kl * nt + j) * kWarp + lane) * 4 + r) * 4;
}
// Reduction along k: accumulator c of token tile j of the warp with k-part `part` (>= 1) and row
// tile `tile`, lane `lane`.
VNM_HD constexpr int decode_red_byte(int wt, int nt, int part, int tile, int j, int c, int lane) {
  return (((((part - 1) * wt + tile) * nt + j) * 4 + c) * kWarp + lane) * 4;
}

// ---- dispatch ----------------------------------------------------------------------------------

constexpr int kDecodeMaxTokens = 32;  // N <= this: the memory-bound decode kernel

enum class Path : int { automatic = 0, decode = 1, tiled = 2 };

// Row tile of the tiled kernel: the CTA's rows must share one kidx column block (BM divides
// V), except with M == 4 where every block selects columns 0..3 (p.M, not KB == 1: KB is also 1
// for M > 4 whenever R' == V).
inline int tiled_bm(const PackedGeom& p) {
  if (p.M == 4 || p.row_block % 128 == 0) return 128;
  if (p.row_block % 64 == 0) return 64;
  if (p.row_block % 32 == 0) return 32;
  return 16;
}

inline Path choose_path(const PackedGeom&, int64_t n_tokens) {
  return n_tokens <= kDecodeMaxTokens ? Path::decode : Path::tiled;
}

// fp32 scratch floats spmm needs for n_tokens with `path` (0 unless the decode kernel splits K).
inline int64_t spmm_workspace_floats(const PackedGeom& p, int64_t n_tokens, Path path,
                                     int64_t decode_splits = 0) {
  if (path == Path::automatic) path = choose_path(p, n_tokens);
  if (path != Path::decode || n_tokens <= 0) return 0;
  return decode_plan(p, n_tokens, decode_splits).workspace_floats(n_tokens, p.R);
}

// Whether the kernels read B (x) straight, without the kidx gather: every column kept
// (keeps_every_column), no input perm folded into kidx (gather_forced covers that and an explicit
// request), and x rows that allow the 16-byte (8-element) copies.
inline bool contiguous_b(const PackedGeom& p, bool gather_forced, int64_t ldx, bool x_aligned16) {
  return p.keeps_every_column() && !gather_forced && p.K % 8 == 0 && ldx % 8 == 0 && x_aligned16;
}

// What the dispatcher (vnm::cuda::plan) launches, kept here so that the CPU emulation tests run
// the very plan the GPU would.
struct KernelPlan {
  Path path = Path::decode;
  int bm = 0;  // row tile: tiled_bm for the tiled kernel, kTileRows for decode
  bool contiguous_b = false;
  bool transposed_x = false;  // the tiled kernel gathers kept rows of x^T (SpmmParams::xt)
};
inline KernelPlan kernel_plan(const PackedGeom& p, int64_t n_tokens, Path requested,
                              bool gather_forced, int64_t ldx, bool x_aligned16) {
  KernelPlan out;
  out.path = requested == Path::automatic ? choose_path(p, n_tokens) : requested;
  out.bm = out.path == Path::tiled ? tiled_bm(p) : kTileRows;
  out.contiguous_b = contiguous_b(p, gather_forced, ldx, x_aligned16);
  out.transposed_x = out.path == Path::tiled && !out.contiguous_b;
  return out;
}

}  // namespace vnm::sp
