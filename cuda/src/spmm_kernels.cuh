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
// Tuning lever (not done, unmeasured): for large N a one-off gathered, k-major copy of x
// (K x N per column block, VENOM-style) turns every B load into 16-byte cp.async.
//
// Decode kernel (N <= 32): decode.cuh.
//
// Tiled kernel (N > 32): a CTA computes BM rows x BN = 128 tokens (TileShape in sp_layout.h);
// A and metadata come through a STAGES-deep cp.async pipeline in shared memory (lane-ordered,
// so each fragment is one conflict-free 16-byte shared load), B is loaded one k-step ahead into
// registers and stored into a double-buffered, XOR-swizzled [token][32 k] tile read with
// ldmatrix .x4 (one instruction per B fragment). The epilogue adds the bias in fp32, rounds once
// and writes through a shared tile so global stores run along R (with out_rows, a row
// permutation, each store goes to its output row: the same y row, scattered columns). BM must divide into V (one
// kidx block per CTA) unless M == 4: 64, 32 or 16 (sp::tiled_bm). Levers: BM = 128, BN = 64 /
// 256, cp.async for the contiguous B path, vectorised epilogue stores, persistent / swizzled
// rasterisation, wgmma.sp on sm_90a.
#pragma once

#include "common.cuh"
#include "launch.h"

namespace vnm::cuda::dev {

// T: element type traits (F16 / BF16). S: the CTA tile, an sp::TileShape (rows BM, tokens BN,
// warps WARPS_M x WARPS_N each owning WM x WN mma tiles, STAGES-deep A/metadata pipeline).
template <class T, class S>
__global__ void __launch_bounds__(S::THREADS) spmm_tiled_kernel(const KernelArgs a) {
  using namespace vnm::sp;
  __shared__ __align__(16) unsigned char smem[S::SMEM_BYTES];
  uint4* As = reinterpret_cast<uint4*>(smem);                                // [STAGES][MT_CTA][32]
  uint32_t* Ms = reinterpret_cast<uint32_t*>(smem + S::A_BYTES);             // [STAGES][MT_CTA][16]
  uint16_t* Bs = reinterpret_cast<uint16_t*>(smem + S::A_BYTES + S::META_BYTES);  // [2][BN * 32]

  const PackedGeom& p = a.p;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
  const int64_t m0 = int64_t(blockIdx.x) * S::BM, n0 = int64_t(blockIdx.y) * S::BN;
  const int64_t mt0 = m0 / kTileRows;
  const int32_t* kbase = a.kidx + kidx_step_index(p, p.kidx_block(m0), 0);

  // A and metadata of k-step ks into pipeline stage `stage` (16-byte chunks, zero past MT).
  auto copy_a = [&](int64_t ks, int stage) {
#pragma unroll
    for (int c0 = 0; c0 < S::COPY_CHUNKS; c0 += S::THREADS) {
      const int c = c0 + tid;
      if (c < S::COPY_CHUNKS) {
        const CopySlot s = copy_slot<S>(c);
        const int64_t mt = mt0 + s.mt_local;
        const bool ok = mt < p.MT;
        if (!s.meta) {
          const uint16_t* src = ok ? a.values_p + packed_value_index(p, mt, ks, s.part, 0) : a.values_p;
          cp_async16(As + (stage * S::MT_CTA + s.mt_local) * kWarp + s.part, src, ok);
        } else {
          const uint32_t* src = ok ? a.meta_p + packed_meta_index(p, mt, ks, 4 * s.part) : a.meta_p;
          cp_async16(Ms + (stage * S::MT_CTA + s.mt_local) * 16 + 4 * s.part, src, ok);
        }
      }
    }
  };

  // B of k-step ks into the staging registers (global loads in flight during the mma.sp).
  uint32_t breg[S::B_REGS];
  auto load_b = [&](int64_t ks) {
    if (a.contig) {
#pragma unroll
      for (int j = 0; j < S::B_CHUNKS; ++j) {
        const int64_t tok = n0 + b_chunk_token<S>(tid, j);
        const int64_t col = ks * kStepK + b_chunk_k(tid);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (tok < a.n_tokens && col < p.K) v = ld_ro_v4(a.x + tok * a.ldx + col);  // K % 8 == 0
        breg[4 * j + 0] = v.x;
        breg[4 * j + 1] = v.y;
        breg[4 * j + 2] = v.z;
        breg[4 * j + 3] = v.w;
      }
    } else {
      const int2 kk = ld_ro_i2(kbase + ks * kStepK + b_pair_k(tid));
#pragma unroll
      for (int j = 0; j < S::B_PAIRS; ++j) {
        const int64_t tok = n0 + b_pair_token<S>(tid, j);
        const bool ok = tok < a.n_tokens;
        const int64_t row = ok ? tok * a.ldx : 0;
        const uint16_t lo = (ok && kk.x >= 0) ? ld_ro_u16(a.x + row + kk.x) : uint16_t(0);
        const uint16_t hi = (ok && kk.y >= 0) ? ld_ro_u16(a.x + row + kk.y) : uint16_t(0);
        breg[j] = pack16(lo, hi);
      }
    }
  };
  auto store_b = [&](int buf) {
    uint16_t* B = Bs + buf * S::BN * kStepK;
    if (a.contig) {
#pragma unroll
      for (int j = 0; j < S::B_CHUNKS; ++j)
        *reinterpret_cast<uint4*>(B + bs_offset(b_chunk_token<S>(tid, j), b_chunk_k(tid))) =
            make_uint4(breg[4 * j], breg[4 * j + 1], breg[4 * j + 2], breg[4 * j + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < S::B_PAIRS; ++j)
        *reinterpret_cast<uint32_t*>(B + bs_offset(b_pair_token<S>(tid, j), b_pair_k(tid))) = breg[j];
    }
  };

  float acc[S::WM][S::WN][4];
#pragma unroll
  for (int i = 0; i < S::WM; ++i)
#pragma unroll
    for (int j = 0; j < S::WN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  auto compute = [&](int stage, int buf) {
    uint32_t af[S::WM][4], ef[S::WM];
#pragma unroll
    for (int i = 0; i < S::WM; ++i) {
      const int mtl = wm * S::WM + i;
      const uint4 v = As[(stage * S::MT_CTA + mtl) * kWarp + lane];
      af[i][0] = v.x;
      af[i][1] = v.y;
      af[i][2] = v.z;
      af[i][3] = v.w;
      ef[i] = Ms[(stage * S::MT_CTA + mtl) * 16 + meta_word_of_lane(lane)];
    }
    const uint16_t* B = Bs + buf * S::BN * kStepK;
#pragma unroll
    for (int j = 0; j < S::WN; ++j) {
      uint32_t bf[4];
      ldmatrix_x4(bf, B + bs_ldsm_offset(lane, (wn * S::WN + j) * kTileTokens));
#pragma unroll
      for (int i = 0; i < S::WM; ++i)
        if (mt0 + wm * S::WM + i < p.MT) mma_sp<T>(acc[i][j], af[i], bf, ef[i]);  // warp-uniform
    }
  };

  // Pipeline: A/metadata STAGES - 1 k-steps ahead (cp.async groups), B one k-step ahead.
#pragma unroll
  for (int s = 0; s < S::STAGES - 1; ++s) {
    if (s < p.KS) copy_a(s, s);
    cp_async_commit();
  }
  load_b(0);
  store_b(0);
  for (int64_t ks = 0; ks < p.KS; ++ks) {
    cp_async_wait<S::STAGES - 2>();  // k-step ks's group has landed (this thread's copies)
    __syncthreads();                 // ... everyone's; and stage/buffer reuse below is safe
    const int64_t ahead = ks + S::STAGES - 1;
    if (ahead < p.KS) copy_a(ahead, int(ahead % S::STAGES));
    cp_async_commit();
    const bool more = ks + 1 < p.KS;
    if (more) load_b(ks + 1);
    compute(int(ks % S::STAGES), int(ks & 1));
    if (more) store_b(int((ks + 1) & 1));  // buffer read in k-step ks - 1, fenced by the barrier
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: bias in fp32, one rounding, into a [token][row] shared tile, then stores along R.
  uint16_t* Cs = reinterpret_cast<uint16_t*>(smem);
  float bias_v[S::WM][2];  // a thread's accumulators cover 2 rows per row tile
#pragma unroll
  for (int i = 0; i < S::WM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = m0 + (wm * S::WM + i) * kTileRows + c_elem(lane, 2 * h).row;
      bias_v[i][h] = (a.bias && r < p.R) ? T::to_float(a.bias[out_row(a.out_rows, r)]) : 0.0f;
    }
#pragma unroll
  for (int i = 0; i < S::WM; ++i)
#pragma unroll
    for (int j = 0; j < S::WN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const CElem el = c_elem(lane, c);
        const int rr = (wm * S::WM + i) * kTileRows + el.row;
        const int nn = (wn * S::WN + j) * kTileTokens + el.n;
        Cs[nn * S::C_PITCH + rr] = T::from_float(acc[i][j][c] + bias_v[i][c >> 1]);
      }
  __syncthreads();
  for (int idx = tid; idx < S::BN * S::BM; idx += S::THREADS) {
    const int nn = idx / S::BM, rr = idx % S::BM;
    const int64_t tok = n0 + nn, r = m0 + rr;
    if (tok < a.n_tokens && r < p.R) a.y[tok * a.ldy + out_row(a.out_rows, r)] = Cs[nn * S::C_PITCH + rr];
  }
}

template <class T, class S>
cudaError_t launch_tiled(const KernelArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned((a.p.MT + S::MT_CTA - 1) / S::MT_CTA),
                  unsigned((a.n_tokens + S::BN - 1) / S::BN));
  spmm_tiled_kernel<T, S><<<grid, S::THREADS, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace vnm::cuda::dev
