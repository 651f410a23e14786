// Device helpers shared by the vnm kernels: element types, loads, cp.async, ldmatrix, mma.sp.
// Each carries the one reason it exists.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vnm/sp_layout.h"

namespace vnm::cuda::dev {

// ---- element types: the kernels move raw 16-bit patterns; only the epilogue converts ----------

struct F16 {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __half2float(__ushort_as_half(b));
  }
  // Round to nearest even, as the CPU reference (vnm::float_to_half) and torch do.
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __half_as_ushort(__float2half_rn(v));
  }
};

struct BF16 {
  static __device__ __forceinline__ float to_float(uint16_t b) {
    return __uint_as_float(uint32_t(b) << 16);
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

// d += A * B on the sparse tensor cores. ::ordered_metadata is the current PTX spelling for
// sm_80+ (indices ascending in every nibble, which the canonical storage guarantees); selector
// 0: lanes with t = 0, 1 supply e (PTX ISA "Matrix Fragments for sparse mma.m16n8k32 with .f16
// and .bf16 types").
template <class T>
__device__ __forceinline__ void mma_sp(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[4], uint32_t e);

template <>
__device__ __forceinline__ void mma_sp<F16>(float (&d)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

template <>
__device__ __forceinline__ void mma_sp<BF16>(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
        "r"(e));
}

// Four 8x8 b16 matrices from shared memory in one instruction: the whole B fragment of one
// mma.sp (PTX ISA "ldmatrix"; lane l gives the row address of row l & 7 of matrix l >> 3).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy that bypasses registers and L1 (.cg: A tiles are read once per
// CTA, L2 keeps them for the other token tiles); src_bytes = 0 writes 16 zero bytes and reads
// nothing (PTX ISA "cp.async", ignore-src / zero fill), used past the last row tile.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// "memory": no shared-memory read may be hoisted above the wait (the barrier after it also
// orders the other threads' copies).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Weights stream through once per CTA in the decode kernel: read-only path, no L1 allocation
// (PTX ld .L1::no_allocate), so L1 keeps x and kidx, which every k-step re-reads.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// x, kidx and the metadata are read-only for the whole launch: the non-coherent read-only path
// (ld.global.nc) caches them in L1 across the warps of a CTA.
__device__ __forceinline__ uint16_t ld_ro_u16(const uint16_t* p) { return __ldg(p); }
__device__ __forceinline__ uint32_t ld_ro_u32(const uint32_t* p) { return __ldg(p); }
__device__ __forceinline__ int2 ld_ro_i2(const int32_t* p) {
  return __ldg(reinterpret_cast<const int2*>(p));
}
__device__ __forceinline__ uint4 ld_ro_v4(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Two 16-bit values into one mma operand register, the lower-k (or first) one in bits 15:0 as
// the fragment layouts require.
__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

}  // namespace vnm::cuda::dev
