// The one dispatch point of the SpMM kernels: argument checks, device checks, the choice of
// kernel (decode / tiled, row tile, B path) and the launch. No allocation, no synchronisation.
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdio>
#include <string>

#include "launch.h"
#include "tiled.h"
#include "vnm/cuda.h"
#include "vnm/dtype.h"

namespace vnm::cuda {
namespace {

thread_local std::string g_last_error;

int fail(int status, const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  g_last_error = buf;
  return status;
}

bool aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Selects `device` for the calling thread and restores the previous one on exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) == cudaSuccess && prev_ != device)
      changed_ = cudaSetDevice(device) == cudaSuccess;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
  bool changed_ = false;
};

// kOk when `device` exists and has mma.sp (compute capability 8.0 or newer).
int check_device(int device) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return fail(kNoDevice, "no CUDA device is available (%s)",
                e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found none");
  }
  if (device < 0 || device >= count)
    return fail(kInvalidArgument, "device %d does not exist (%d visible)", device, count);
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major < 8)
    return fail(kUnsupportedArch,
                "CUDA device %d has compute capability %d.%d; the V:N:M kernels use mma.sp, "
                "which needs 8.0 (Ampere) or newer. Run on the CPU instead.",
                device, major, minor);
  // cudart keeps the last error of a failed earlier call on this thread until it is read; clear
  // it so check_launch's cudaGetLastError reports this launch, not a stale failure.
  cudaGetLastError();
  return kOk;
}

int check_geom(const sp::PackedGeom& p) {
  if (p.R <= 0 || p.K <= 0 || p.M < 4 || p.row_block <= 0 || p.row_block % sp::kTileRows != 0 ||
      p.Rp != p.MT * sp::kTileRows || p.Rp < p.R || p.G != (p.K + p.M - 1) / p.M ||
      p.KS != (p.G + sp::kStepGroups - 1) / sp::kStepGroups || p.Gp != p.KS * sp::kStepGroups ||
      !(p.KB == 1 || p.KB * p.row_block == p.Rp) || p.meta_cols != (p.G + 1) / 2)
    return fail(kInvalidArgument, "inconsistent packed geometry (R=%lld, K=%lld, M=%lld)",
                (long long)p.R, (long long)p.K, (long long)p.M);
  return kOk;
}

int check_launch(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return kOk;
  return fail(kCudaError, "%s failed: %s", what, cudaGetErrorString(e));
}

template <class T>
cudaError_t launch_tiled_as(const dev::TiledArgs& a, int bm, bool contiguous, cudaStream_t s) {
  if (contiguous) return dev::launch_tiled<T, sp::TileM128, false>(a, s);  // M == 4: bm 128
  switch (bm) {
    case 128: return dev::launch_tiled<T, sp::TileM128, true>(a, s);
    case 64: return dev::launch_tiled<T, sp::TileM64, true>(a, s);
    case 32: return dev::launch_tiled<T, sp::TileM32, true>(a, s);
    default: return dev::launch_tiled<T, sp::TileM16, true>(a, s);
  }
}

int bn_of(int bm) { return bm == 128 ? sp::TileM128::BN : sp::TileM64::BN; }

// The tiled branch of spmm(): argument checks of its 32-bit indexing and of xt, then the launch.
int spmm_tiled(const SpmmParams& q, const Plan& pl, cudaStream_t stream) {
  constexpr int64_t kMax = int64_t(1) << 30;  // element offsets and pitches stay 32-bit
  if (q.n_tokens >= kMax || q.geom.K >= kMax || q.geom.R >= kMax || q.ldx >= kMax ||
      q.ldy >= kMax || q.ldxt >= kMax || q.geom.MT * q.geom.KS * sp::kWarp * 8 >= (int64_t(1) << 31))
    return fail(kInvalidArgument, "too large for the tiled kernel's 32-bit indexing "
                "(n_tokens=%lld, K=%lld, R=%lld); split the batch or the layer",
                (long long)q.n_tokens, (long long)q.geom.K, (long long)q.geom.R);
  if (pl.transposed_x &&
      (!q.xt || q.ldxt < q.n_tokens || q.ldxt % 8 != 0 || !aligned(q.xt, 16)))
    return fail(kInvalidArgument,
                "the tiled kernel gathers rows of x transposed: pass xt (K x ldxt, k-major, "
                "ldxt a multiple of 8 >= n_tokens=%lld, 16-byte aligned; got ldxt=%lld); "
                "vnm.cuda_ops.transpose_x makes it",
                (long long)q.n_tokens, (long long)q.ldxt);
  dev::TiledArgs a;
  a.values_p = static_cast<const uint16_t*>(q.values_p);
  a.meta_p = q.meta_p;
  a.kidx = q.kidx;
  a.b = static_cast<const uint16_t*>(pl.transposed_x ? q.xt : q.x);
  a.ldb = int(pl.transposed_x ? q.ldxt : q.ldx);
  a.n_tokens = int(q.n_tokens);
  a.K = int(q.geom.K);
  a.R = int(q.geom.R);
  a.MT = int(q.geom.MT);
  a.KS = int(q.geom.KS);
  a.kidx_block_rows = q.geom.M == 4 ? 0 : int(q.geom.row_block);
  a.kidx_block_stride = int(q.geom.Gp * 4);
  a.bias = static_cast<const uint16_t*>(q.bias);
  a.out_rows = q.out_rows;
  a.y = static_cast<uint16_t*>(q.y);
  a.ldy = int(q.ldy);
  a.vector_store = !q.out_rows && q.ldy % 8 == 0 && aligned(q.y, 16);
  const cudaError_t e =
      q.dtype == int(DType::bf16)
          ? launch_tiled_as<dev::BF16>(a, pl.bm, pl.contiguous_b, stream)
          : launch_tiled_as<dev::F16>(a, pl.bm, pl.contiguous_b, stream);
  return check_launch(e, "SpMM tiled kernel launch");
}

}  // namespace

const char* last_error() { return g_last_error.c_str(); }

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

Plan plan(const SpmmParams& q) {
  // sp::kernel_plan decides (the CPU emulation tests run the same function); B is read without
  // a gather only when the pattern's M is 4 (not when KB == 1, which also means R' <= V).
  const sp::KernelPlan k = sp::kernel_plan(q.geom, q.n_tokens, static_cast<sp::Path>(q.path),
                                           q.has_perm || q.force_gather, q.ldx, aligned(q.x, 16));
  Plan out;
  out.path = int(k.path);
  out.bm = k.bm;
  out.contiguous_b = k.contiguous_b;
  out.transposed_x = k.transposed_x;
  if (k.path == sp::Path::decode)
    out.splits = sp::decode_plan(q.geom, q.n_tokens, q.decode_splits).splits;
  return out;
}

int spmm(const SpmmParams& q) {
  if (q.dtype != int(DType::f16) && q.dtype != int(DType::bf16))
    return fail(kUnsupportedDtype,
                "the mma.sp kernels take float16 or bfloat16 (got dtype code %d); cast the "
                "weight and input, or use CPU tensors for float32",
                q.dtype);
  if (int st = check_geom(q.geom)) return st;
  if (q.n_tokens < 0 || q.ldx < q.geom.K || q.ldy < q.geom.R || q.path < 0 || q.path > 2)
    return fail(kInvalidArgument, "bad sizes: n_tokens=%lld ldx=%lld (K=%lld) ldy=%lld (R=%lld)",
                (long long)q.n_tokens, (long long)q.ldx, (long long)q.geom.K, (long long)q.ldy,
                (long long)q.geom.R);
  if (!q.values_p || !q.meta_p || !q.kidx || !q.y || (q.n_tokens > 0 && !q.x))
    return fail(kInvalidArgument, "a required pointer is null");
  if (!aligned(q.values_p, 16) || !aligned(q.meta_p, 16) || !aligned(q.kidx, 8))
    return fail(kMisaligned,
                "packed arrays must be 16-byte (values, meta) and 8-byte (kidx) aligned for the "
                "kernels' vector loads; pass the tensors vnm.cuda_ops.pack returns, not views "
                "into them");
  if (!aligned(q.x, 2) || !aligned(q.y, 2) || (q.bias && !aligned(q.bias, 2)) ||
      (q.out_rows && !aligned(q.out_rows, 4)))
    return fail(kMisaligned, "x, y and bias must be 2-byte aligned, out_rows 4-byte");
  if (q.n_tokens == 0) return kOk;
  const Plan pl = plan(q);
  const bool decode = pl.path == int(sp::Path::decode);
  sp::DecodePlan dp;
  if (decode) dp = sp::decode_plan(q.geom, q.n_tokens, q.decode_splits);
  const int64_t grid_tokens =
      decode ? dp.token_ctas : (q.n_tokens + bn_of(pl.bm) - 1) / bn_of(pl.bm);
  if (grid_tokens > 65535 || q.geom.MT > 0x7FFFFFFF)
    return fail(kInvalidArgument, "too many tokens for one launch (%lld); split the batch",
                (long long)q.n_tokens);
  // The decode kernel's 32-bit k-step counters and 16-byte-unit shared offsets.
  if (decode && (q.geom.KS * sp::kWarp * 8 > 0x7FFFFFFF || dp.smem_bytes() > 227 * 1024))
    return fail(kInvalidArgument, "K = %lld is too large for the decode kernel", (long long)q.geom.K);
  const int64_t ws_need = decode ? dp.workspace_floats(q.n_tokens, q.geom.R) : 0;
  if (q.workspace && q.workspace_floats < ws_need)
    return fail(kInvalidArgument,
                "the decode split-K workspace holds %lld floats but %lld are needed; size it with "
                "sp::spmm_workspace_floats (vnm._C._spmm_workspace_floats)",
                (long long)q.workspace_floats, (long long)ws_need);

  DeviceGuard guard(q.device);
  if (int st = check_device(q.device)) return st;

  cudaStream_t stream = static_cast<cudaStream_t>(q.stream);
  if (pl.path == int(sp::Path::tiled)) return spmm_tiled(q, pl, stream);

  dev::KernelArgs a;
  a.p = q.geom;
  a.values_p = static_cast<const uint16_t*>(q.values_p);
  a.meta_p = q.meta_p;
  a.kidx = q.kidx;
  a.x = static_cast<const uint16_t*>(q.x);
  a.n_tokens = q.n_tokens;
  a.ldx = q.ldx;
  a.bias = static_cast<const uint16_t*>(q.bias);
  a.out_rows = q.out_rows;
  a.y = static_cast<uint16_t*>(q.y);
  a.ldy = q.ldy;
  a.contig = pl.contiguous_b ? 1 : 0;
  // The decode kernel (the tiled one returned above).
  const bool bf = q.dtype == int(DType::bf16);
  float* ws = q.workspace;
  const bool own_ws = ws_need > 0 && !ws;
  cudaError_t e;
  if (own_ws) {  // stream-ordered, so graph capture and other streams stay correct
    e = cudaMallocAsync(reinterpret_cast<void**>(&ws), size_t(ws_need) * sizeof(float), stream);
    if (e != cudaSuccess) return check_launch(e, "decode split-K workspace allocation");
  }
  e = bf ? dev::launch_decode<dev::BF16>(a, dp, ws, stream)
         : dev::launch_decode<dev::F16>(a, dp, ws, stream);
  if (own_ws) {
    const cudaError_t ef = cudaFreeAsync(ws, stream);
    if (e == cudaSuccess) e = ef;
  }
  return check_launch(e, "SpMM decode kernel launch");
}

// ---- packing (kernels in pack.cu) ------------------------------------------------------------

namespace dev {
cudaError_t launch_pack(const PackParams& q, cudaStream_t stream);
cudaError_t launch_unpack(const UnpackParams& q, cudaStream_t stream);
cudaError_t launch_to_dense(const DenseParams& q, cudaStream_t stream);
}  // namespace dev

int pack(const PackParams& q) {
  if (int st = check_geom(q.geom)) return st;
  if (!q.values || !q.meta || !q.columns || !q.values_p || !q.meta_p || !q.kidx)
    return fail(kInvalidArgument, "a required pointer is null");
  DeviceGuard guard(q.device);
  if (int st = check_device(q.device)) return st;
  return check_launch(dev::launch_pack(q, static_cast<cudaStream_t>(q.stream)), "pack");
}

int unpack(const UnpackParams& q) {
  if (int st = check_geom(q.geom)) return st;
  if (!q.values || !q.meta || !q.columns || !q.values_p || !q.meta_p || !q.kidx)
    return fail(kInvalidArgument, "a required pointer is null");
  DeviceGuard guard(q.device);
  if (int st = check_device(q.device)) return st;
  return check_launch(dev::launch_unpack(q, static_cast<cudaStream_t>(q.stream)), "unpack");
}

int packed_to_dense(const DenseParams& q) {
  if (int st = check_geom(q.geom)) return st;
  if (!q.values_p || !q.meta_p || !q.kidx || !q.dense)
    return fail(kInvalidArgument, "a required pointer is null");
  DeviceGuard guard(q.device);
  if (int st = check_device(q.device)) return st;
  return check_launch(dev::launch_to_dense(q, static_cast<cudaStream_t>(q.stream)),
                      "packed_to_dense");
}

}  // namespace vnm::cuda
