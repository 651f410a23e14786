// A CPU model of the warp-level instructions the SpMM kernels use, and CPU emulations of the
// kernels built on it. CI has no GPU: these run the kernels' own index functions (sp_layout.h)
// over the packed layout and compare with the reference SpMM, so the layout is proven without
// a GPU.
//
// What "bit-exact" covers: the model reproduces the PTX ISA's fragment ownership (which lane
// holds which A, B, C/D element), the metadata register layout and sparsity selector, the
// ::ordered_metadata rule and ldmatrix's lane/row mapping exactly; a wrong index anywhere moves
// a value to a different place and the result is wrong by O(1), not by rounding. Arithmetic is
// not specified bit for bit by PTX (the hardware's internal accumulation order and precision are
// undocumented): the model forms every product exactly in fp32 (fp16 x fp16 and bf16 x bf16
// products are exact in fp32), sums the 32 products of each output in k order in fp32 and then
// adds the accumulator. Comparisons with the GPU or the reference therefore use a tolerance.
#pragma once

#include <cstdint>
#include <string>

#include "vnm/dtype.h"
#include "vnm/sp_layout.h"

namespace vnm::sp {

// d = A * B + c for one warp of mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.t.t.f32
// (t = f16 or bf16): a, b, e are the registers of lanes 0..31, `selector` the sparsity selector
// (0 or 1). `acc` is c on entry and d on return. Returns "" or what is invalid (a metadata
// nibble with repeated or descending indices, which PTX leaves undefined).
std::string mma_sp_m16n8k32(DType t, const uint32_t a[kWarp][4], const uint32_t b[kWarp][4],
                            const uint32_t e[kWarp], int selector, float acc[kWarp][4]);

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l supplies the address of row (l & 7) of matrix
// (l >> 3) as an element offset into `smem`; returns each lane's four registers.
void ldmatrix_x4(const uint16_t* smem, const int row_offset[kWarp], uint32_t out[kWarp][4]);

// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: the same row addresses; each 8 x 8 matrix is
// delivered transposed: lane l receives in register m the elements (row 2 (l & 3), column
// l >> 2) and (row 2 (l & 3) + 1, column l >> 2) of matrix m (PTX ISA "ldmatrix", .trans).
void ldmatrix_x4_trans(const uint16_t* smem, const int row_offset[kWarp], uint32_t out[kWarp][4]);

// The tiled kernel (cuda/src/tiled.cuh) on the CPU, thread by thread: every cp.async (source,
// zero fill, shared-memory destination), the pipeline's stage ring, every ldmatrix / shared
// load of the compute loop at the kernel's own addresses, mma.sp by the model above, and the
// epilogue. The shared memory starts poisoned (0xFF: NaN values, invalid metadata), and the run
// is made twice: copies landing when issued (a copy overwriting data still to be read shows)
// and landing only at their cp.async.wait_group (a read before the data landed shows); both
// must agree. contiguous_b picks the path that reads x directly (valid only when
// sp::contiguous_b holds); otherwise x is transposed to K x transposed_x_pitch(n) with NaN in
// the pitch padding, which must never reach y. Returns "" or the first problem found.
std::string emulate_tiled(const PackedGeom& p, DType t, const uint16_t* values_p,
                          const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                          const uint16_t* x, int64_t n_tokens, int64_t ldx, const uint16_t* bias,
                          uint16_t* y, int64_t ldy, bool contiguous_b);

// Runs the decode or the tiled CUDA kernel on the CPU, thread by thread where the kernel's data
// movement depends on the thread, with the model above for every mma.sp and ldmatrix.
// Arguments as vnm::cuda::SpmmParams: x is n_tokens x K (row pitch ldx), y n_tokens x R (row
// pitch ldy), bias R values or null (output order), out_rows R output rows or null, all 16-bit
// values of dtype t (f16 or bf16). `contiguous_b` selects the kernel's gather-free B path (valid
// only for M == 4 without perm, K % 8 == 0; the decode kernel has a single B path).
// decode_splits forces the decode kernel's k splits as vnm::cuda::SpmmParams::decode_splits does
// (0: sp::decode_plan's choice, which depends on the shape only). Returns "" or the first
// problem the model found.
std::string emulate_spmm(const PackedGeom& p, DType t, const uint16_t* values_p,
                         const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                         const void* x, int64_t n_tokens, int64_t ldx, const void* bias, void* y,
                         int64_t ldy, Path path, bool contiguous_b,
                         int64_t decode_splits = 0);

}  // namespace vnm::sp
