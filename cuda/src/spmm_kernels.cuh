// The V:N:M SpMM kernels: y = x @ W^T (+ bias) with W in the packed layout of sp_layout.h,
// computed as y^T = W x^T: the sparse weights are mma.sp's A operand (16 rows x 32 logical k),
// the tokens its B operand (32 k x 8 tokens), fp32 accumulators.
//
// How B is formed. One k-step is 8 groups of the pattern = 8 x 4 selected columns = the 32
// logical k of one mma.sp, spanning 8 M columns of x. kidx (packed) gives, per column block of
// V rows and k-step, the x column of each of the 32 k (perm already applied, negative = zero):
//   * gather path (M > 4, or any perm): each B element is one 16-bit read-only load of
//     x[token, kidx[k]] (x stays as torch stores it, (N, K) row-major);
//   * contiguous path (M == 4 without perm, K % 8 == 0, 16-byte aligned rows): k maps to x
//     column 32 ks + k, so plain 2:4 reads B with 16-byte loads and pays no gather.
// (The tiled kernel, tiled.cuh, instead gathers kept rows of a k-major copy of x by cp.async.)
//
// Decode kernel (N <= 32): one CTA per 16-row tile and 32 tokens; its 8 warps split the k-steps
// (warp w takes k-steps w, w + 8, ...), each keeps one k-step of loads in flight ahead of its
// mma.sp (A: one 16-byte streaming load per lane, 512 contiguous bytes a warp), and the CTA adds
// the 8 partial tiles through shared memory. Levers: split-K across CTAs for small R, deeper
// prefetch, wider tiles.
//
// The tiled kernel (N > 32) is in tiled.cuh.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace vnm::cuda::dev {

// T: element type traits (F16 / BF16: the mma.sp variant and the epilogue conversions).
template <class T>
__global__ void __launch_bounds__(sp::kDecodeWarps * sp::kWarp)
    spmm_decode_kernel(const KernelArgs a) {
  using namespace vnm::sp;
  // Partial accumulators of the 8 warps: [warp][tile][c][lane], conflict-free on both sides.
  __shared__ float red[kDecodeWarps][kDecodeTiles][4][kWarp];
  const PackedGeom& p = a.p;
  const int lane = int(threadIdx.x) & 31, w = int(threadIdx.x) >> 5;
  const int64_t mt = blockIdx.x;
  const int64_t tok0 = int64_t(blockIdx.y) * kDecodeTiles * kTileTokens;
  const int64_t left = a.n_tokens - tok0;
  const int tiles = left >= kDecodeTiles * kTileTokens ? kDecodeTiles
                                                       : int((left + kTileTokens - 1) / kTileTokens);
  const int32_t* kbase = a.kidx + kidx_step_index(p, p.kidx_block(mt * kTileRows), 0);
  const int64_t tok_lane = tok0 + b_elem(lane, 0).n;  // B column (token) of this lane, tile 0

  struct Frag {
    uint32_t a[4];
    uint32_t e;
    uint32_t b[kDecodeTiles][4];
  };
  auto load = [&](Frag& f, int64_t ks) {
    const uint4 v = ld_stream_v4(a.values_p + packed_value_index(p, mt, ks, lane, 0));
    f.a[0] = v.x;
    f.a[1] = v.y;
    f.a[2] = v.z;
    f.a[3] = v.w;
    f.e = ld_ro_u32(a.meta_p + packed_meta_index(p, mt, ks, meta_word_of_lane(lane)));
    if (a.contig) {
#pragma unroll
      for (int j = 0; j < kDecodeTiles; ++j) {
        const int64_t tok = tok_lane + j * kTileTokens;
        const bool ok = j < tiles && tok < a.n_tokens;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t col = ks * kStepK + b_elem(lane, 2 * r).k;  // even: a 4-byte pair
          f.b[j][r] = (ok && col < p.K)
                          ? ld_ro_u32(reinterpret_cast<const uint32_t*>(a.x + tok * a.ldx + col))
                          : 0u;
        }
      }
    } else {
      const int32_t* step = kbase + ks * kStepK;
      int2 kk[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) kk[r] = ld_ro_i2(step + b_elem(lane, 2 * r).k);
#pragma unroll
      for (int j = 0; j < kDecodeTiles; ++j) {
        const int64_t tok = tok_lane + j * kTileTokens;
        const bool ok = j < tiles && tok < a.n_tokens;
        const int64_t row = ok ? tok * a.ldx : 0;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const uint16_t lo = (ok && kk[r].x >= 0) ? ld_ro_u16(a.x + row + kk[r].x) : uint16_t(0);
          const uint16_t hi = (ok && kk[r].y >= 0) ? ld_ro_u16(a.x + row + kk[r].y) : uint16_t(0);
          f.b[j][r] = pack16(lo, hi);
        }
      }
    }
  };

  float acc[kDecodeTiles][4] = {};
  int64_t ks = w;
  if (ks < p.KS) {
    Frag cur;
    load(cur, ks);
    while (true) {
      const int64_t next = ks + kDecodeWarps;
      const bool more = next < p.KS;
      Frag nxt;
      if (more) load(nxt, next);  // in flight while this k-step's mma.sp run
#pragma unroll
      for (int j = 0; j < kDecodeTiles; ++j)
        if (j < tiles) mma_sp<T>(acc[j], cur.a, cur.b[j], cur.e);
      if (!more) break;
      cur = nxt;
      ks = next;
    }
  }

#pragma unroll
  for (int j = 0; j < kDecodeTiles; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) red[w][j][c][lane] = acc[j][c];
  __syncthreads();
  for (int idx = int(threadIdx.x); idx < kDecodeTiles * 4 * kWarp; idx += int(blockDim.x)) {
    const int j = idx / (4 * kWarp), c = (idx / kWarp) & 3, l = idx & 31;
    if (j >= tiles) continue;
    float v = 0.0f;
#pragma unroll
    for (int ww = 0; ww < kDecodeWarps; ++ww) v += red[ww][j][c][l];  // warp order, as the model
    const CElem el = c_elem(l, c);
    const int64_t r = mt * kTileRows + el.row;
    const int64_t tok = tok0 + j * kTileTokens + el.n;
    if (r < p.R && tok < a.n_tokens) {
      const int64_t o = out_row(a.out_rows, r);
      const float b = a.bias ? T::to_float(a.bias[o]) : 0.0f;
      a.y[tok * a.ldy + o] = T::from_float(v + b);
    }
  }
}

template <class T>
cudaError_t launch_decode(const KernelArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned(a.p.MT),
                  unsigned((a.n_tokens + sp::kDecodeTiles * sp::kTileTokens - 1) /
                           (sp::kDecodeTiles * sp::kTileTokens)));
  spmm_decode_kernel<T><<<grid, sp::kDecodeWarps * sp::kWarp, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace vnm::cuda::dev
