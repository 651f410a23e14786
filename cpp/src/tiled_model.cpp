// CPU emulation of the tiled SpMM kernel (cuda/src/tiled.cuh), thread by thread, over the index
// maps of sp_layout.h that the kernel itself uses: the proof of its data layout without a GPU.
//
// Shared memory is a byte array, poisoned at the start of every CTA. Each cp.async of each
// thread is recorded with its source (or zero fill) and destination; the pipeline runs in the
// kernel's order (prologue, then per stage: wait, barrier, issue the stage STAGES - 1 ahead,
// compute). Two landing models bracket the hardware: "early" applies a copy when issued (a copy
// that overwrites a stage still to be read corrupts the result), "late" applies a group only at
// the cp.async.wait_group that guarantees it (a read before the data landed sees poison). Both
// runs must produce the same y.
#include <algorithm>
#include <cstring>
#include <deque>
#include <vector>

#include "vnm/format.h"
#include "vnm/mma_model.h"

namespace vnm::sp {
namespace {

uint16_t nan_bits(DType t) { return t == DType::bf16 ? uint16_t(0x7FC0) : uint16_t(0x7E00); }

float to_float(DType t, uint16_t b) { return t == DType::bf16 ? bf16_to_float(b) : half_to_float(b); }
uint16_t from_float(DType t, float v) { return t == DType::bf16 ? float_to_bf16(v) : float_to_half(v); }

struct Copy {
  int dst;
  uint8_t bytes[16];
};

class SharedMemory {
 public:
  SharedMemory(int size, bool land_late) : mem_(size_t(size)), late_(land_late) {}
  void poison() { std::fill(mem_.begin(), mem_.end(), uint8_t(0xFF)); }
  // cp.async 16 bytes from src (null: zero fill).
  void cp16(int dst, const void* src) {
    Copy c{dst, {}};
    if (src) std::memcpy(c.bytes, src, 16);
    if (late_) open_.push_back(c);
    else land(c);
  }
  void commit() {
    groups_.push_back(std::move(open_));
    open_.clear();
  }
  void wait(int pending) {
    while (int(groups_.size()) > pending) {
      for (const Copy& c : groups_.front()) land(c);
      groups_.pop_front();
    }
  }
  uint8_t* data() { return mem_.data(); }
  uint32_t word(int byte) const {
    uint32_t w;
    std::memcpy(&w, mem_.data() + byte, 4);
    return w;
  }

 private:
  void land(const Copy& c) { std::memcpy(mem_.data() + c.dst, c.bytes, 16); }
  std::vector<uint8_t> mem_;
  bool late_;
  std::vector<Copy> open_;
  std::deque<std::vector<Copy>> groups_;
};

struct Args {
  const PackedGeom& p;
  DType t;
  const uint16_t* values_p;
  const uint32_t* meta_p;
  const int32_t* kidx;
  const int32_t* out_rows;
  const uint16_t* b;  // x (contiguous) or x^T (gathered)
  int64_t ldb, n_tokens;
  const uint16_t* bias;
  uint16_t* y;
  int64_t ldy;
};

template <class S, bool kGather>
std::string run(const Args& q, bool land_late) {
  const PackedGeom& p = q.p;
  const int MT = int(p.MT), KS = int(p.KS), N = int(q.n_tokens), K = int(p.K), R = int(p.R);
  const int n_stages = int(ceil_div(KS, S::KPS));
  const bool vector_store = !q.out_rows && q.ldy % 8 == 0;
  constexpr int WARPS = S::WARPS_M * S::WARPS_N;
  SharedMemory sm(S::SMEM_BYTES, land_late);
  std::vector<float> acc(size_t(WARPS) * S::WM * S::WN * kWarp * 4);
  auto acc_at = [&](int warp, int i, int j) {
    return reinterpret_cast<float(*)[4]>(acc.data() + ((size_t(warp) * S::WM + i) * S::WN + j) * kWarp * 4);
  };
  for (int bx = 0; bx < int(ceil_div(MT, S::MT_CTA)); ++bx) {
    for (int by = 0; by < int(ceil_div(N, S::BN)); ++by) {
      const int m0 = bx * S::BM, n0 = by * S::BN, mt0 = m0 / kTileRows;
      const int kb = p.M == 4 ? 0 : m0 / int(p.row_block);
      sm.poison();
      std::fill(acc.begin(), acc.end(), 0.0f);

      auto issue = [&](int t, int stage) -> std::string {
        for (int tid = 0; tid < S::THREADS; ++tid) {
          if (tid < S::META_CHUNKS) {  // the stage's metadata, one chunk per thread
            const int kk = meta_copy_kstep<S>(tid), ml = meta_copy_tile<S>(tid);
            const int quarter = meta_copy_quarter(tid), ks = t * S::KPS + kk;
            const int mt = std::min(mt0 + ml, MT - 1);
            sm.cp16(stage + tile_meta_offset<S>(kk, ml, 4 * quarter),
                    q.meta_p + packed_meta_index(p, mt, kk == 0 || ks < KS ? ks : t * S::KPS, 4 * quarter));
          }
          for (int kk = 0; kk < S::KPS; ++kk) {
            const int ks = t * S::KPS + kk;
            const bool step_ok = kk == 0 || ks < KS;
            for (int j = 0; j < S::A_COPIES; ++j) {
              if (tid + j * S::THREADS >= S::MT_CTA * kWarp) continue;
              const ACopy c = a_copy<S>(tid, j), c0 = a_copy<S>(tid, 0);
              const int mt = std::min(mt0 + c.mt_local, MT - 1);
              // the kernel writes copy j at copy 0's offset + j * THREADS * 16
              const int dst = tile_a_offset<S>(kk, c0.mt_local, c0.lane) + j * S::THREADS * 16;
              if (dst != tile_a_offset<S>(kk, c.mt_local, c.lane)) return "A copy stride mismatch";
              sm.cp16(stage + dst,
                      step_ok ? q.values_p + packed_value_index(p, mt, ks, c.lane, 0) : nullptr);
            }
            if (!kGather) {
              for (int j = 0; j < S::BC_COPIES; ++j) {
                const int n = bc_copy_token<S>(tid, j), k = bc_copy_k(tid);
                const int col = ks * kStepK + k;
                const bool ok = n0 + n < N && col < K;
                // the kernel writes copy j at copy 0's offset + j * (THREADS / 4) tokens
                const int dst = 2 * bs_offset(bc_copy_token<S>(tid, 0), k) + j * (S::THREADS / 4) * kStepK * 2;
                if (dst != 2 * bs_offset(n, k)) return "contiguous B copy stride mismatch";
                sm.cp16(stage + S::B_OFF + kk * S::B_STEP + dst,
                        ok ? q.b + int64_t(n0 + n) * q.ldb + col : nullptr);
              }
            } else {
              for (int r = 0; r < S::BG_ROWS; ++r) {
                const int k = bg_copy_row0(tid) + r;
                const int32_t kr = ks < KS ? q.kidx[kidx_step_index(p, kb, ks) + k] : -1;
                for (int u = 0; u < S::BG_CHUNKS; ++u) {
                  const int tok = n0 + 8 * bg_copy_chunk(tid, u);
                  const bool ok = kr >= 0 && tok < q.ldb;
                  sm.cp16(stage + S::B_OFF + kk * S::B_STEP + 2 * bt_offset<S::BN>(k, 8 * bg_copy_chunk(tid, u)),
                          ok ? q.b + int64_t(kr) * q.ldb + tok : nullptr);
                }
              }
            }
          }
        }
        return {};
      };

      std::string err;
      auto compute = [&](int stage) {
        const uint16_t* smem16 = reinterpret_cast<const uint16_t*>(sm.data());
        for (int warp = 0; warp < WARPS; ++warp) {
          const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
          // The kernel's per-lane read offsets (k-step 0 of a stage), as it computes them.
          int a_rd[kWarp], m_rd[kWarp], b_rd[kWarp];
          for (int lane = 0; lane < kWarp; ++lane) {
            a_rd[lane] = tile_a_offset<S>(0, wm * S::WM, lane);
            m_rd[lane] = tile_meta_offset<S>(0, wm * S::WM, meta_word_of_lane(lane));
            b_rd[lane] = S::B_OFF + 2 * (kGather ? bt_ldsm_offset<S::BN>(lane, wn * S::WN * kTileTokens)
                                                 : bs_ldsm_offset(lane, wn * S::WN * kTileTokens));
          }
          for (int kk = 0; kk < S::KPS; ++kk) {
            uint32_t a[S::WM][kWarp][4], e[S::WM][kWarp];
            for (int i = 0; i < S::WM; ++i)
              for (int lane = 0; lane < kWarp; ++lane) {
                const int base = stage + a_rd[lane] + kk * S::A_STEP + i * kWarp * 16;
                for (int r = 0; r < 4; ++r) a[i][lane][r] = sm.word(base + 4 * r);
                e[i][lane] = sm.word(stage + m_rd[lane] + kk * S::META_STEP + i * 64);
              }
            for (int j = 0; j < S::WN; ++j) {
              int rows[kWarp];  // element offsets of the row addresses
              for (int lane = 0; lane < kWarp; ++lane) {
                const int byte = kGather ? stage + kk * S::B_STEP + (b_rd[lane] ^ (j << 4))
                                         : stage + kk * S::B_STEP + b_rd[lane] + j * kTileTokens * kStepK * 2;
                rows[lane] = byte / 2;
              }
              uint32_t b[kWarp][4];
              if (kGather) ldmatrix_x4_trans(smem16, rows, b);
              else ldmatrix_x4(smem16, rows, b);
              for (int i = 0; i < S::WM; ++i) {
                std::string e2 = mma_sp_m16n8k32(q.t, a[i], b, e[i], 0, acc_at(warp, i, j));
                if (!e2.empty() && err.empty()) err = e2;
              }
            }
          }
        }
      };

      int write_stage = 0, read_stage = 0;
      for (int s = 0; s < S::STAGES - 1; ++s) {
        if (s < n_stages) {
          const std::string e = issue(s, write_stage);
          if (!e.empty()) return e;
        }
        sm.commit();
        write_stage += S::STAGE_BYTES;
      }
      for (int it = 0; it < n_stages; ++it) {
        sm.wait(S::STAGES - 2);
        const int t = it + S::STAGES - 1;
        if (t < n_stages) {
          const std::string e = issue(t, write_stage);
          if (!e.empty()) return e;
        }
        sm.commit();
        write_stage += S::STAGE_BYTES;
        if (write_stage == S::PIPE_BYTES) write_stage = 0;
        compute(read_stage);
        if (!err.empty()) return err;
        read_stage += S::STAGE_BYTES;
        if (read_stage == S::PIPE_BYTES) read_stage = 0;
      }
      sm.wait(0);

      // Epilogue: bias in fp32, one rounding, the [token][row] tile, then the stores.
      uint16_t* Cs = reinterpret_cast<uint16_t*>(sm.data());
      for (int warp = 0; warp < WARPS; ++warp) {
        const int wm = warp / S::WARPS_N, wn = warp % S::WARPS_N;
        for (int i = 0; i < S::WM; ++i)
          for (int j = 0; j < S::WN; ++j)
            for (int lane = 0; lane < kWarp; ++lane)
              for (int c = 0; c < 4; ++c) {
                const CElem el = c_elem(lane, c);
                const int rr = (wm * S::WM + i) * kTileRows + el.row;
                const int nn = (wn * S::WN + j) * kTileTokens + el.n;
                const int r = m0 + rr;
                const float bv = (q.bias && r < R) ? to_float(q.t, q.bias[out_row(q.out_rows, r)]) : 0.0f;
                Cs[nn * S::C_PITCH + rr] = from_float(q.t, acc_at(warp, i, j)[lane][c] + bv);
              }
      }
      for (int e = 0; e < S::EPI_CHUNKS; ++e) {
        const int nn = epi_token<S>(e), rr = epi_row<S>(e);
        const int tok = n0 + nn, r0 = m0 + rr;
        if (tok >= N || r0 >= R) continue;
        const uint16_t* src = Cs + nn * S::C_PITCH + rr;
        uint16_t* dst = q.y + int64_t(tok) * q.ldy;
        if (vector_store && r0 + 8 <= R) {
          std::memcpy(dst + r0, src, 16);
        } else {
          for (int k = 0; k < 8 && r0 + k < R; ++k) dst[out_row(q.out_rows, r0 + k)] = src[k];
        }
      }
    }
  }
  return {};
}

template <bool kGather>
std::string run_tile(const Args& q, bool land_late) {
  switch (tiled_bm(q.p)) {
    case 128: return run<TileM128, kGather>(q, land_late);
    case 64: return run<TileM64, kGather>(q, land_late);
    case 32: return run<TileM32, kGather>(q, land_late);
    default: return run<TileM16, kGather>(q, land_late);
  }
}

}  // namespace

std::string emulate_tiled(const PackedGeom& p, DType t, const uint16_t* values_p,
                          const uint32_t* meta_p, const int32_t* kidx, const int32_t* out_rows,
                          const uint16_t* x, int64_t n_tokens, int64_t ldx, const uint16_t* bias,
                          uint16_t* y, int64_t ldy, bool contiguous_b) {
  if (n_tokens <= 0) return {};
  if (contiguous_b && !sp::contiguous_b(p, false, ldx, true))
    return "the tiled kernel reads x directly only for M == 4 with K % 8 == 0";
  // The gathered path reads x transposed, as vnm.cuda_ops.transpose_x makes it; the pitch
  // padding is NaN here, so a padding column that reached a stored output would show.
  std::vector<uint16_t> xt;
  const int64_t ldxt = transposed_x_pitch(n_tokens);
  if (!contiguous_b) {
    xt.assign(size_t(p.K * ldxt), nan_bits(t));
    for (int64_t n = 0; n < n_tokens; ++n)
      for (int64_t k = 0; k < p.K; ++k) xt[size_t(k * ldxt + n)] = x[n * ldx + k];
  }
  const Args early{p, t, values_p, meta_p, kidx, out_rows, contiguous_b ? x : xt.data(),
                   contiguous_b ? ldx : ldxt, n_tokens, bias, y, ldy};
  std::vector<uint16_t> y_late(size_t(n_tokens * ldy));
  std::memcpy(y_late.data(), y, y_late.size() * 2);  // the same starting contents (poison)
  Args late = early;
  late.y = y_late.data();
  for (const bool land_late : {false, true}) {
    const Args* a = land_late ? &late : &early;
    std::string err = contiguous_b ? run_tile<false>(*a, land_late) : run_tile<true>(*a, land_late);
    if (!err.empty()) return err + (land_late ? " (copies landing at their wait)" : " (copies landing at issue)");
  }
  if (std::memcmp(y_late.data(), y, y_late.size() * 2) != 0)
    return "the tiled pipeline reads a stage before its copies land or after they are overwritten "
           "(outputs differ between the two landing models)";
  return {};
}

}  // namespace vnm::sp
