// The tiled SpMM kernel (N > 32): y^T = W x^T for a CTA tile of BM weight rows x BN tokens.
//
// Data movement (index maps in sp_layout.h, emulated on the CPU by cpp/src/tiled_model.cpp):
//   * every operand reaches shared memory by 16-byte cp.async, STAGES stages of KPS k-steps,
//     one barrier per stage; stage bases advance by compare-and-reset;
//   * A (packed values, one 16-byte fragment per lane) and the metadata words are copied as
//     they lie in global memory; rows past the last tile copy the last tile, so the MMAs are
//     unpredicated and the extra rows are never stored;
//   * B, contiguous path (kGather = false: M == 4 without perm, x 16-byte aligned, K % 8 == 0):
//     each token's 64 bytes of the k-step, read by ldmatrix;
//   * B, gathered path (kGather = true: M > 4, or a perm): x^T (k-major, pitch ldb) is read by
//     kept row: the 32 kidx of a k-step name 32 rows of x^T, each a contiguous run of the CTA's
//     tokens moved by 16-byte copies; the kidx of the next stage are loaded into registers one
//     stage ahead (each thread needs 4 consecutive indices a k-step: one 16-byte load). Read by
//     ldmatrix .trans. Negative kidx (padding) zero-fill;
//   * epilogue: bias in fp32, one rounding, a [token][row] shared tile, then 16-byte stores along
//     R where rows are in order (vector_store), else one store per element at out_rows[r].
#pragma once

#include <atomic>

#include "common.cuh"
#include "tiled.h"

namespace vnm::cuda::dev {
namespace tiled {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte global -> shared copy, bypassing L1; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

}  // namespace tiled

template <class T, class S, bool kGather>
__global__ void __launch_bounds__(S::THREADS) spmm_tiled_kernel(const TiledArgs a) {
  using namespace vnm::sp;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t sbase = tiled::smem_addr(smem);
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
  const int m0 = int(blockIdx.x) * S::BM, n0 = int(blockIdx.y) * S::BN;
  const int mt0 = m0 / kTileRows;
  static_assert(S::B_OFF % 128 == 0 && S::WN <= 8, "the XOR of ldmatrix .trans row addresses");
  const int n_stages = (a.KS + S::KPS - 1) / S::KPS;

  // ---- per-thread copy sources, hoisted: pointers at k-step 0, advanced by one stage per issue.
  // Destinations: copy j of a thread lies a constant stride after copy 0 (a_copy: THREADS
  // chunks further; bc_copy_token: THREADS / 4 tokens further, the same swizzle), so one offset
  // register each and immediates.
  const char* a_src[S::A_COPIES];
  const uint32_t a_dst = uint32_t(tile_a_offset<S>(0, a_copy<S>(tid, 0).mt_local, a_copy<S>(tid, 0).lane));
#pragma unroll
  for (int j = 0; j < S::A_COPIES; ++j) {
    const ACopy c = a_copy<S>(tid, j);
    const int mt = min(mt0 + c.mt_local, a.MT - 1);  // rows past MT: the last tile, never stored
    a_src[j] = reinterpret_cast<const char*>(a.values_p) + (size_t(mt) * a.KS * kWarp + c.lane) * 16;
  }
  const bool meta_thread = tid < S::META_CHUNKS;
  const int m_kk = meta_thread ? meta_copy_kstep<S>(tid) : 0;  // k-step of the stage it copies
  const char* m_src;
  uint32_t m_dst;
  {
    const int ml = meta_thread ? meta_copy_tile<S>(tid) : 0;
    const int mt = min(mt0 + ml, a.MT - 1);
    m_src = reinterpret_cast<const char*>(a.meta_p) + (size_t(mt) * a.KS * 16 + 4 * meta_copy_quarter(tid)) * 4;
    m_dst = uint32_t(tile_meta_offset<S>(m_kk, ml, 4 * meta_copy_quarter(tid)));
  }

  // Contiguous B: token row pointers (clamped into x; their copies are zero-filled).
  constexpr int BC = kGather ? 1 : S::BC_COPIES;
  const char* bc_src[BC];
  bool bc_tok_ok[BC];
  uint32_t bc_dst = 0;
  int bc_col = 0;  // x column of this thread's chunk in the current k-step
  // Gathered B: x^T at this thread's first token chunk (chunk u is 256 bytes further), the kidx
  // pointer of the next stage to load and its registers. Copies whose source is not read
  // (src_bytes 0: padding kidx, tokens past ldb) may carry an address outside x^T.
  const char* bg_src = nullptr;
  bool bg_tok_ok[kGather ? S::BG_CHUNKS : 1];
  const uint32_t ldb_bytes = uint32_t(a.ldb) * 2;
  // Destination of row bg_copy_row0 + r, chunk u: (bg_dst ^ (r << 4)) + r * 2 BN + 256 u. The
  // rows of a thread differ only in bits 0-1 of k, whose swizzle XOR touches byte-offset bits
  // 4-5 alone (bt_offset; B_OFF keeps bits 4-6 clear); the emulation checks the identity.
  uint32_t bg_dst = 0;
  const int32_t* kid_ptr = nullptr;
  int4 kid[S::KPS];
  if constexpr (!kGather) {
#pragma unroll
    for (int j = 0; j < BC; ++j) {
      const int tok = n0 + bc_copy_token<S>(tid, j);
      bc_tok_ok[j] = tok < a.n_tokens;
      bc_src[j] = reinterpret_cast<const char*>(a.b) +
                  (size_t(min(tok, a.n_tokens - 1)) * a.ldb + bc_copy_k(tid)) * 2;
    }
    bc_dst = uint32_t(S::B_OFF + 2 * bs_offset(bc_copy_token<S>(tid, 0), bc_copy_k(tid)));
    bc_col = bc_copy_k(tid);
  } else {
#pragma unroll
    for (int u = 0; u < S::BG_CHUNKS; ++u)
      bg_tok_ok[u] = n0 + 8 * bg_copy_chunk(tid, u) < a.ldb;
    bg_dst = uint32_t(S::B_OFF + 2 * bt_offset<S::BN>(bg_copy_row0(tid), 8 * bg_copy_chunk(tid, 0)));
    bg_src = reinterpret_cast<const char*>(a.b) + size_t(n0 + 8 * bg_copy_chunk(tid, 0)) * 2;
    const int kb = a.kidx_block_rows ? m0 / a.kidx_block_rows : 0;
    kid_ptr = a.kidx + size_t(kb) * a.kidx_block_stride + bg_copy_row0(tid);
  }
  (void)bc_src; (void)bc_tok_ok; (void)bc_dst; (void)bc_col; (void)bg_src; (void)bg_tok_ok;
  (void)ldb_bytes; (void)bg_dst;

  // kidx of stage t into registers (k-steps past KS read nothing: all their rows zero-fill).
  auto load_kidx = [&](int t) {
#pragma unroll
    for (int kk = 0; kk < S::KPS; ++kk)
      kid[kk] = t * S::KPS + kk < a.KS ? __ldg(reinterpret_cast<const int4*>(kid_ptr + kk * kStepK))
                                       : make_int4(-1, -1, -1, -1);
    kid_ptr += S::KPS * kStepK;
  };

  // Issue every copy of stage t (the next one: stages are issued in order) into the stage at
  // byte offset `stage`; the source pointers then advance by one stage.
  auto issue = [&](int t, uint32_t stage) {
    const uint32_t dst0 = sbase + stage;
#pragma unroll
    for (int kk = 0; kk < S::KPS; ++kk) {
      const bool step_ok = kk == 0 || t * S::KPS + kk < a.KS;  // k-step 0 of a stage exists
      const int a_bytes = step_ok ? 16 : 0;
#pragma unroll
      for (int j = 0; j < S::A_COPIES; ++j)
        if (S::MT_CTA * kWarp % S::THREADS == 0 || tid + j * S::THREADS < S::MT_CTA * kWarp)
          tiled::cp16(dst0 + a_dst + j * S::THREADS * 16 + kk * S::A_STEP, a_src[j] + kk * kWarp * 16,
                      a_bytes);
      if constexpr (!kGather) {
        const int col = (t * S::KPS + kk) * kStepK + bc_col;
#pragma unroll
        for (int j = 0; j < BC; ++j)
          tiled::cp16(dst0 + bc_dst + j * (S::THREADS / 4) * kStepK * 2 + kk * S::B_STEP,
                      bc_src[j] + kk * kStepK * 2, bc_tok_ok[j] && col < a.K ? 16 : 0);
      } else {
        const int kr[4] = {kid[kk].x, kid[kk].y, kid[kk].z, kid[kk].w};
#pragma unroll
        for (int r = 0; r < S::BG_ROWS; ++r) {
          // unsigned 32 x 32 -> 64 (one IMAD.WIDE.U32): a negative (padding) kidx makes a wild
          // address that src_bytes 0 never reads
          const char* row = bg_src + uint64_t(uint32_t(kr[r])) * ldb_bytes;
          const uint32_t dst = dst0 + kk * S::B_STEP + (bg_dst ^ uint32_t(r << 4)) + r * 2 * S::BN;
#pragma unroll
          for (int u = 0; u < S::BG_CHUNKS; ++u)
            tiled::cp16(dst + 256 * u, row + 256 * u, kr[r] >= 0 && bg_tok_ok[u] ? 16 : 0);
        }
      }
    }
    // The stage's metadata, one copy; a k-step past KS takes k-step 0's metadata (valid
    // nibbles; its A and B are zero). k-step 0 of an issued stage is always < KS.
    if (meta_thread)
      tiled::cp16(dst0 + m_dst, m_src + (t * S::KPS + m_kk < a.KS ? m_kk * 64 : 0), 16);
#pragma unroll
    for (int j = 0; j < S::A_COPIES; ++j) a_src[j] += S::KPS * kWarp * 16;
    m_src += S::KPS * 64;
    if constexpr (!kGather) {
#pragma unroll
      for (int j = 0; j < BC; ++j) bc_src[j] += S::KPS * kStepK * 2;
    }
  };

  float acc[S::WM][S::WN][4];
#pragma unroll
  for (int i = 0; i < S::WM; ++i)
#pragma unroll
    for (int j = 0; j < S::WN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // Per-lane shared-memory read offsets within a stage (k-step 0).
  const uint32_t a_rd = uint32_t(tile_a_offset<S>(0, wm * S::WM, lane));
  const uint32_t m_rd = uint32_t(tile_meta_offset<S>(0, wm * S::WM, meta_word_of_lane(lane)));
  const uint32_t b_rd =
      uint32_t(S::B_OFF + 2 * (kGather ? bt_ldsm_offset<S::BN>(lane, wn * S::WN * kTileTokens)
                                       : bs_ldsm_offset(lane, wn * S::WN * kTileTokens)));

  auto compute = [&](uint32_t stage) {
    const uint32_t base = sbase + stage;
#pragma unroll
    for (int kk = 0; kk < S::KPS; ++kk) {
      uint32_t af[S::WM][4], ef[S::WM];
#pragma unroll
      for (int i = 0; i < S::WM; ++i) {
        const uint4 v = tiled::lds128(base + a_rd + kk * S::A_STEP + i * kWarp * 16);
        af[i][0] = v.x;
        af[i][1] = v.y;
        af[i][2] = v.z;
        af[i][3] = v.w;
        ef[i] = tiled::lds32(base + m_rd + kk * S::META_STEP + i * 64);
      }
#pragma unroll
      for (int j = 0; j < S::WN; ++j) {
        uint32_t bf[4];
        if constexpr (kGather) {
          // token chunk wn*WN + j of row k = lane sits at chunk ((wn*WN + j) ^ k) & 7 | high bits:
          // the same XOR of the byte offset's bits 4..6 by j (WN == 8, chunks 8-aligned per warp)
          tiled::ldsm_x4_trans(bf, base + kk * S::B_STEP + (b_rd ^ uint32_t(j << 4)));
        } else {
          tiled::ldsm_x4(bf, base + kk * S::B_STEP + b_rd + j * kTileTokens * kStepK * 2);
        }
#pragma unroll
        for (int i = 0; i < S::WM; ++i) mma_sp<T>(acc[i][j], af[i], bf, ef[i]);
      }
    }
  };

  // ---- pipeline: STAGES - 1 stages in flight ahead of the one computed.
  uint32_t write_stage = 0, read_stage = 0;
  if constexpr (kGather) load_kidx(0);
#pragma unroll
  for (int s = 0; s < S::STAGES - 1; ++s) {
    if (s < n_stages) {
      issue(s, write_stage);
      if constexpr (kGather) load_kidx(s + 1);
    }
    cp_async_commit();
    write_stage += S::STAGE_BYTES;
  }
  for (int it = 0; it < n_stages; ++it) {
    cp_async_wait<S::STAGES - 2>();  // stage it has landed (this thread's copies) ...
    __syncthreads();                 // ... and everyone's; the stage written below was read at it-1
    const int t = it + S::STAGES - 1;
    if (t < n_stages) {
      issue(t, write_stage);
      if constexpr (kGather) load_kidx(t + 1);  // in flight during this stage's MMAs
    }
    cp_async_commit();
    write_stage += S::STAGE_BYTES;
    if (write_stage == S::PIPE_BYTES) write_stage = 0;
    compute(read_stage);
    read_stage += S::STAGE_BYTES;
    if (read_stage == S::PIPE_BYTES) read_stage = 0;
  }
  cp_async_wait<0>();
  __syncthreads();

  // ---- epilogue: bias in fp32, one rounding, into the [token][row] tile, then stores along R.
  uint16_t* Cs = reinterpret_cast<uint16_t*>(smem);
  float bias_v[S::WM][2];
#pragma unroll
  for (int i = 0; i < S::WM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m0 + (wm * S::WM + i) * kTileRows + c_elem(lane, 2 * h).row;
      bias_v[i][h] = (a.bias && r < a.R) ? T::to_float(a.bias[out_row(a.out_rows, r)]) : 0.0f;
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
  for (int e = tid; e < S::EPI_CHUNKS; e += S::THREADS) {
    const int nn = epi_token<S>(e), rr = epi_row<S>(e);
    const int tok = n0 + nn, r0 = m0 + rr;
    if (tok >= a.n_tokens || r0 >= a.R) continue;
    const uint16_t* src = Cs + nn * S::C_PITCH + rr;
    uint16_t* dst = a.y + size_t(tok) * a.ldy;
    if (a.vector_store && r0 + 8 <= a.R) {
      *reinterpret_cast<uint4*>(dst + r0) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int q = 0; q < 8 && r0 + q < a.R; ++q) dst[out_row(a.out_rows, r0 + q)] = src[q];
    }
  }
}

template <class T, class S, bool kGather>
cudaError_t launch_tiled(const TiledArgs& a, cudaStream_t stream) {
  auto kernel = spmm_tiled_kernel<T, S, kGather>;
  // Above 48 KB a kernel opts in to its dynamic shared memory, once per device (the attribute
  // belongs to the device's context); the bit is set only after the call succeeded.
  static std::atomic<uint64_t> opted_in{0};
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (!bit || !(opted_in.load(std::memory_order_relaxed) & bit)) {
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::SMEM_BYTES);
    if (e != cudaSuccess) return e;
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  const dim3 grid(unsigned((a.MT + S::MT_CTA - 1) / S::MT_CTA),
                  unsigned((a.n_tokens + S::BN - 1) / S::BN));
  kernel<<<grid, S::THREADS, S::SMEM_BYTES, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace vnm::cuda::dev
