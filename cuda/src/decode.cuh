// The decode SpMM kernel (N <= 32 tokens, memory bound): y = x @ W^T (+ bias), W in the packed
// layout of sp_layout.h, computed as y^T = W x^T with mma.sp (weights A, tokens B).
//
// What bounds it is the weight stream, so it is built around that (sp::DecodePlan explains the
// split; the CPU emulation in cpp/src/mma_model.cpp mirrors every index used here):
//   * Each warp owns one 16-row tile and a range of k-steps and streams its A fragments (512 B a
//     k-step, 16-byte copies) and each lane its own metadata word (4-byte copies) through its
//     own kDecodeStages-deep cp.async pipeline, with an L2 evict-first policy (the weights are
//     read once; x, kidx and the partials should stay in L2). A lane reads only what it copied,
//     so the main loop has no barrier at all, not even a warp one.
//   * x for the CTA's tokens and k-range is gathered ONCE into shared memory, in B-fragment
//     order: the main loop reads one B fragment with one 16-byte shared load, for every M, perm
//     or not. The gather runs before the loop, while the first stages of weights are in flight;
//     it is the only place x is read from global memory (16-bit loads, each element once per
//     CTA; a k-major x would make them 16-byte copies: lever).
//   * Split-K: warps along k inside the CTA (when V gives fewer than 4 row tiles) reduce through
//     shared memory in warp order; CTAs along k write fp32 partials to a workspace that
//     decode_reduce_kernel adds in split order. Deterministic: no atomics, same bits every run.
//   * kDecodeStepsPerStage (2) k-steps a stage and the loop unrolled by the kDecodeStages stages:
//     no register ping-pong between a "current" and a "next" fragment, stage slots and shared
//     offsets are compile-time constants, 32-bit counters. Shared memory is addressed only
//     through sp::decode_*_byte, which the CPU emulation uses too.
#pragma once

#include <algorithm>
#include <atomic>

#include "common.cuh"
#include "launch.h"

namespace vnm::cuda::dev {

// L2 eviction policy for data read exactly once (PTX ISA "createpolicy"): the weight stream
// should not push x, kidx or the split-K partials out of L2.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// 16-byte cp.async with an L2 cache hint (PTX ISA "cp.async", .L2::cache_hint), issued only
// when `pred` holds (a predicated instruction, no branch): no bytes move otherwise.
__device__ __forceinline__ void cp_async16_if(unsigned smem_addr, const void* gmem, bool pred,
                                              uint64_t policy) {
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %2, 0;\n"
      "  @p cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %3;\n"
      "}\n" ::"r"(smem_addr),
      "l"(gmem), "r"(int(pred)), "l"(policy));
}

// 4-byte cp.async (.ca: the only variant for fewer than 16 bytes), same policy and predicate.
__device__ __forceinline__ void cp_async4_if(unsigned smem_addr, const void* gmem, bool pred,
                                             uint64_t policy) {
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.ne.b32 p, %2, 0;\n"
      "  @p cp.async.ca.shared.global.L2::cache_hint [%0], [%1], 4, %3;\n"
      "}\n" ::"r"(smem_addr),
      "l"(gmem), "r"(int(pred)), "l"(policy));
}

// Keeps a pointer computed once in a register: without it nvcc re-derives it from the kernel
// parameters (constant-bank loads and a 64-bit multiply) at every use inside the gather loop.
template <class P>
__device__ __forceinline__ void pin_register(P*& ptr) {
  asm volatile("" : "+l"(ptr));
}

// T: element type traits (F16 / BF16). NT: n8 token tiles per CTA (1, 2 or 4).
template <class T, int NT>
__global__ void __launch_bounds__(sp::kDecodeThreads)
    spmm_decode_kernel(const KernelArgs a, const DecodeArgs d) {
  using namespace vnm::sp;
  constexpr int KPS = kDecodeStepsPerStage, STAGES = kDecodeStages;
  extern __shared__ uint4 dsmem[];  // byte offsets: decode_*_byte (sp_layout.h)
  unsigned char* const smem = reinterpret_cast<unsigned char*>(dsmem);

  const PackedGeom& p = a.p;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int tile = warp & ((1 << d.wt_shift) - 1);  // row tile of this warp within the CTA
  const int part = warp >> d.wt_shift;              // its share of the CTA's k-range
  const int KS = int(p.KS);
  const int64_t mt0 = int64_t(blockIdx.x) << d.wt_shift;
  const int64_t mt = mt0 + tile;
  const int ks_cta0 = int(blockIdx.y) * d.ks_cta;
  const int ks_w0 = ks_cta0 + part * d.ks_warp;
  const int64_t tok0 = int64_t(blockIdx.z) * (NT * kTileTokens);

  // ---- the weight stream of this warp ------------------------------------------------------
  // The warp's k-steps past KS (last split only) and row tiles past MT (M == 4 only) are neither
  // copied nor multiplied: their B is zero, so they would add nothing. `n_valid` k-steps remain:
  // `full` whole stages of KPS, then `tail` (< KPS) k-steps in one more stage.
  const bool tile_ok = mt < p.MT;
  const int n_valid = tile_ok ? max(min(d.ks_warp, KS - ks_w0), 0) : 0;
  const int full = n_valid / KPS, tail = n_valid - full * KPS;
  const int64_t mt_c = tile_ok ? mt : p.MT - 1;
  // Global sources, advanced one stage at a time (the offsets within a stage are immediates).
  // `left`: valid k-steps from the next issue on.
  const char* a_next = reinterpret_cast<const char*>(
      a.values_p + packed_value_index(p, mt_c, min(ks_w0, KS - 1), lane, 0));
  const char* m_next = reinterpret_cast<const char*>(
      a.meta_p + packed_meta_index(p, mt_c, min(ks_w0, KS - 1), meta_word_of_lane(lane)));
  int left = n_valid;
  const uint64_t policy = evict_first_policy();
  const unsigned smem0 = static_cast<unsigned>(__cvta_generic_to_shared(dsmem));
  constexpr int A_STEP_BYTES = kWarp * 16, M_STEP_BYTES = 64;  // global bytes per k-step

  // Stage `slot` <- the next KPS k-steps (those past the valid ones are not copied).
  auto issue = [&](int slot) {
#pragma unroll
    for (int s = 0; s < KPS; ++s) {
      cp_async16_if(smem0 + decode_a_byte(slot, warp, s, lane), a_next + s * A_STEP_BYTES, left > s,
                    policy);
      cp_async4_if(smem0 + decode_meta_byte(slot, warp, s, lane), m_next + s * M_STEP_BYTES,
                   left > s, policy);
    }
    a_next += KPS * A_STEP_BYTES;
    m_next += KPS * M_STEP_BYTES;
    left -= KPS;
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    issue(s);
    cp_async_commit();
  }

  // ---- x of the CTA's tokens and k-range, gathered once into B-fragment order -------------
  // Thread tid fills register r = tid & 3 of fragment lane tid >> 2 for every local k-step and
  // token tile.
  {
    const int b_lane = tid >> 2;
    const BElem e0 = b_elem(b_lane, 2 * (tid & 3));  // k of the pair's low half, token g
    const int2* kx = reinterpret_cast<const int2*>(
        a.kidx + kidx_step_index(p, p.kidx_block(mt0 * kTileRows), ks_cta0) + e0.k);
    // Every load is unconditional and in bounds: a token past N reads row 0, a padding column
    // (kidx < 0) column 0, and the pair is masked to zero afterwards (no predicated loads, no
    // zero-initialised registers).
    const uint16_t* xrow[NT];
    uint32_t tok_mask[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t tok = tok0 + j * kTileTokens + e0.n;
      tok_mask[j] = tok < a.n_tokens ? 0xFFFFFFFFu : 0u;
      xrow[j] = a.x + (tok < a.n_tokens ? tok : 0) * a.ldx;
      pin_register(xrow[j]);
    }
    pin_register(kx);
    const int kl_end = max(0, min(d.ks_cta, KS - ks_cta0));  // local k-steps past KS: zeros
    const int b_lane_r = tid & 3;
    auto dst = [&](int kl, int j) -> uint32_t& {
      return *reinterpret_cast<uint32_t*>(smem + decode_b_byte(NT, kl, j, b_lane, b_lane_r));
    };
#pragma unroll 4
    for (int kl = 0; kl < kl_end; ++kl) {
      const int2 kk = ld_ro_i2(reinterpret_cast<const int32_t*>(kx + kl * (kStepK / 2)));
      const uint32_t col_mask = (kk.x >= 0 ? 0x0000FFFFu : 0u) | (kk.y >= 0 ? 0xFFFF0000u : 0u);
      const int c0 = max(kk.x, 0), c1 = max(kk.y, 0);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t pair = pack16(ld_ro_u16(xrow[j] + c0), ld_ro_u16(xrow[j] + c1));
        dst(kl, j) = pair & col_mask & tok_mask[j];
      }
    }
    for (int kl = kl_end; kl < d.ks_cta; ++kl)
#pragma unroll
      for (int j = 0; j < NT; ++j) dst(kl, j) = 0u;
  }
  __syncthreads();

  // ---- main loop: unrolled by STAGES stages of KPS k-steps; STAGES - 1 stages in flight -----
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;
  // B of the round's first k-step: local k-step part * ks_warp + STAGES * KPS * round.
  const uint4* b_round = dsmem + decode_b_byte(NT, part * d.ks_warp, 0, lane, 0) / 16;
  constexpr int B_STEP = (decode_b_byte(NT, 1, 0, 0, 0) - decode_b_byte(NT, 0, 0, 0, 0)) / 16;
  auto compute = [&](int slot, int b_step, int steps) {  // `steps` k-steps of stage `slot`
#pragma unroll
    for (int s = 0; s < KPS; ++s) {
      if (s < steps) {
        const uint4 av = dsmem[decode_a_byte(slot, warp, s, lane) / 16];
        const uint32_t af[4] = {av.x, av.y, av.z, av.w};
        const uint32_t e = reinterpret_cast<const uint32_t*>(dsmem)[decode_meta_byte(slot, warp, s, lane) / 4];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint4 bv =
              b_round[(decode_b_byte(NT, b_step + s, j, 0, 0) - decode_b_byte(NT, 0, 0, 0, 0)) / 16];
          const uint32_t bf[4] = {bv.x, bv.y, bv.z, bv.w};
          mma_sp<T>(acc[j], af, bf, e);
        }
      }
    }
  };
  // Whole rounds of STAGES stages without a per-stage exit test, then the remaining stages.
  auto stage = [&](int st) {
    cp_async_wait<STAGES - 2>();  // this lane's copies of stage st have landed (each lane reads
                                  // only the A and metadata it copied: no warp barrier)
    issue((st + STAGES - 1) % STAGES);  // refills the slot read in the previous stage
    cp_async_commit();
    compute(st, st * KPS, KPS);
  };
  for (int round = full / STAGES; round > 0; --round) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st) stage(st);
    b_round += STAGES * KPS * B_STEP;
  }
  {
    const int rest = full % STAGES;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st)
      if (st < rest) stage(st);
  }
  if (tail > 0) {  // the last, partial stage (its copies went out with the others)
    cp_async_wait<STAGES - 2>();
    const int slot = full % STAGES;
    compute(slot, slot * KPS, tail);
  }
  cp_async_wait<0>();

  // ---- reduction along k inside the CTA (warp order), then the store or the partials -------
  if (d.kparts > 1) {
    __syncthreads();  // every warp is past its pipeline: the stage area becomes the reduction
    const int wt = 1 << d.wt_shift;
    auto red = [&](int q, int j, int c) -> float& {
      return *reinterpret_cast<float*>(smem + decode_red_byte(wt, NT, q, tile, j, c, lane));
    };
    if (part > 0) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          red(part, j, c) = acc[j][c];
    }
    __syncthreads();
    if (part == 0) {
      for (int q = 1; q < d.kparts; ++q)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            acc[j][c] += red(q, j, c);
    }
  }
  if (part != 0) return;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const CElem el = c_elem(lane, c);
      const int64_t r = mt * kTileRows + el.row;
      const int64_t tok = tok0 + j * kTileTokens + el.n;
      if (r >= p.R || tok >= a.n_tokens) continue;
      if (d.ws) {
        d.ws[(int64_t(blockIdx.y) * a.n_tokens + tok) * p.R + r] = acc[j][c];
      } else {
        const int64_t o = out_row(a.out_rows, r);
        const float b = a.bias ? T::to_float(a.bias[o]) : 0.0f;
        a.y[tok * a.ldy + o] = T::from_float(acc[j][c] + b);
      }
    }
}

// Adds the splits' partials in split order, then bias, one rounding, the store (row_perm scatter).
template <class T>
__global__ void __launch_bounds__(256) decode_reduce_kernel(const KernelArgs a, const float* ws,
                                                            int splits) {
  const int64_t R = a.p.R, total = a.n_tokens * R;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    float v = ws[i];
    for (int s = 1; s < splits; ++s) v += ws[s * total + i];
    const int64_t tok = i / R, r = i % R;
    const int64_t o = sp::out_row(a.out_rows, r);
    const float b = a.bias ? T::to_float(a.bias[o]) : 0.0f;
    a.y[tok * a.ldy + o] = T::from_float(v + b);
  }
}

constexpr int kMaxDevices = 64;  // devices whose opt-in is remembered (others opt in every launch)

template <class T, int NT>
cudaError_t launch_decode_nt(const KernelArgs& a, const sp::DecodePlan& d, const DecodeArgs& da,
                             cudaStream_t stream) {
  const size_t smem = size_t(d.smem_bytes());
  if (smem > 48 * 1024) {
    // Beyond the default dynamic shared-memory limit: opt in, once per device and instantiation,
    // for the largest plan (so a later launch, e.g. inside CUDA-graph capture, needs no call).
    static std::atomic<bool> opted_in[kMaxDevices];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev >= kMaxDevices || !opted_in[dev].load(std::memory_order_acquire)) {
      const int most = int(sp::DecodePlan{}.pipe_bytes()) + sp::kDecodeMaxBBytes;
      e = cudaFuncSetAttribute(spmm_decode_kernel<T, NT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               std::max(most, int(smem)));
      if (e != cudaSuccess) return e;
      if (dev < kMaxDevices) opted_in[dev].store(true, std::memory_order_release);
    }
  }
  const dim3 grid(unsigned(d.row_ctas), unsigned(d.splits), unsigned(d.token_ctas));
  spmm_decode_kernel<T, NT><<<grid, sp::kDecodeThreads, smem, stream>>>(a, da);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_decode(const KernelArgs& a, const sp::DecodePlan& d, float* ws,
                          cudaStream_t stream) {
  DecodeArgs da;
  da.wt_shift = d.wt == 4 ? 2 : d.wt == 2 ? 1 : 0;
  da.kparts = d.kparts;
  da.ks_cta = int(d.ks_cta);
  da.ks_warp = int(d.ks_warp);
  da.ws = d.splits > 1 ? ws : nullptr;
  cudaError_t e = d.nt == 1   ? launch_decode_nt<T, 1>(a, d, da, stream)
                  : d.nt == 2 ? launch_decode_nt<T, 2>(a, d, da, stream)
                              : launch_decode_nt<T, 4>(a, d, da, stream);
  if (e != cudaSuccess || d.splits == 1) return e;
  const int64_t total = a.n_tokens * a.p.R;
  const unsigned blocks = unsigned(std::min<int64_t>((total + 255) / 256, 65535));
  decode_reduce_kernel<T><<<blocks, 256, 0, stream>>>(a, ws, int(d.splits));
  return cudaGetLastError();
}

}  // namespace vnm::cuda::dev
