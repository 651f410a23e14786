// vnm_bench_spmm: the V:N:M SpMM kernels against cuBLAS dense (cublasGemmEx, fp32 accumulate)
// on the shapes and patterns of DESIGN.md section 5.
//
//   vnm_bench_spmm [--dtype f16|bf16] [--shapes default|all|RxK,RxK...] [--tokens 1,16,...]
//                  [--patterns 2:4,64:2:8,...] [--warmup 10] [--reps 50]
//
// Weights are random valid V:N:M storage (columns, values and metadata drawn directly, no mask
// search), packed on the GPU. Each (shape, pattern, N) first checks our y against cuBLAS on the
// same (densified) weight, then times both: CUDA events around every launch, the median of
// `reps` after `warmup`, cycling through enough copies of weights and activations to exceed
// twice the L2 cache, so that a small layer is not timed out of L2. Prints one table.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "vnm/cuda.h"
#include "vnm/dtype.h"
#include "vnm/format.h"
#include "vnm/pack.h"

namespace {

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                \
                   cudaGetErrorString(e_));                                             \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

#define CUBLAS_OK(expr)                                                                 \
  do {                                                                                  \
    cublasStatus_t s_ = (expr);                                                         \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                  \
      std::fprintf(stderr, "%s:%d: %s: cuBLAS status %d\n", __FILE__, __LINE__, #expr, \
                   int(s_));                                                            \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

#define VNM_OK(expr)                                                                    \
  do {                                                                                  \
    int st_ = (expr);                                                                   \
    if (st_ != vnm::cuda::kOk) {                                                        \
      std::fprintf(stderr, "%s:%d: %s: status %d: %s\n", __FILE__, __LINE__, #expr, st_, \
                   vnm::cuda::last_error());                                            \
      std::exit(2);                                                                     \
    }                                                                                   \
  } while (0)

struct Shape {
  int64_t R, K;
  const char* name;
};

std::vector<Shape> shapes_for(const std::string& which) {
  const std::vector<Shape> llama7b = {{4096, 4096, "llama7b.attn"},
                                      {12288, 4096, "llama7b.qkv"},
                                      {11008, 4096, "llama7b.up"},
                                      {4096, 11008, "llama7b.down"}};
  const std::vector<Shape> more = {{5120, 5120, "llama13b.attn"},
                                   {13824, 5120, "llama13b.up"},
                                   {5120, 13824, "llama13b.down"},
                                   {768, 768, "bert.attn"},
                                   {3072, 768, "bert.up"},
                                   {768, 3072, "bert.down"},
                                   {384, 384, "deit_s.attn"},
                                   {1536, 384, "deit_s.up"},
                                   {384, 1536, "deit_s.down"}};
  if (which == "default") {
    std::vector<Shape> s = llama7b;
    s.push_back({3072, 768, "bert.up"});
    s.push_back({768, 3072, "bert.down"});
    return s;
  }
  if (which == "all") {
    std::vector<Shape> s = llama7b;
    s.insert(s.end(), more.begin(), more.end());
    return s;
  }
  std::vector<Shape> s;  // "RxK,RxK"
  size_t pos = 0;
  while (pos < which.size()) {
    size_t end = which.find(',', pos);
    if (end == std::string::npos) end = which.size();
    const std::string item = which.substr(pos, end - pos);
    const size_t x = item.find('x');
    if (x == std::string::npos) {
      std::fprintf(stderr, "bad shape '%s' (want RxK)\n", item.c_str());
      std::exit(2);
    }
    s.push_back({std::atoll(item.substr(0, x).c_str()), std::atoll(item.substr(x + 1).c_str()), "custom"});
    pos = end + 1;
  }
  return s;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    if (end > pos) out.push_back(s.substr(pos, end - pos));
    pos = end + 1;
  }
  return out;
}

uint16_t to_bits(vnm::DType t, float v) {
  return t == vnm::DType::bf16 ? vnm::float_to_bf16(v) : vnm::float_to_half(v);
}
float from_bits(vnm::DType t, uint16_t b) {
  return t == vnm::DType::bf16 ? vnm::bf16_to_float(b) : vnm::half_to_float(b);
}

// Random valid canonical storage (format.h): ascending distinct columns per block, legal nibbles.
struct HostStorage {
  std::vector<uint16_t> values;
  std::vector<uint8_t> meta, columns;
};

HostStorage random_storage(const vnm::Layout& L, vnm::DType t, std::mt19937& rng) {
  HostStorage h;
  h.values.resize(size_t(L.values_count()));
  h.meta.assign(size_t(L.meta_bytes()), 0);
  h.columns.resize(size_t(L.columns_bytes()));
  const int M = L.pattern.M;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int> offs(static_cast<size_t>(M));
  for (int64_t rb = 0; rb < L.row_blocks; ++rb)
    for (int64_t g = 0; g < L.groups; ++g) {
      for (int i = 0; i < M; ++i) offs[size_t(i)] = i;
      std::shuffle(offs.begin(), offs.end(), rng);
      std::sort(offs.begin(), offs.begin() + 4);
      for (int s = 0; s < 4; ++s) h.columns[size_t((rb * L.groups + g) * 4 + s)] = uint8_t(offs[size_t(s)]);
    }
  static const uint8_t nibbles[6] = {0x4, 0x8, 0x9, 0xC, 0xD, 0xE};
  std::uniform_int_distribution<int> pick(0, 5);
  for (int64_t r = 0; r < L.padded_rows; ++r)
    for (int64_t g = 0; g < L.groups; ++g) {
      const uint8_t nib = nibbles[pick(rng)];
      h.meta[size_t(L.meta_index(r, g))] |= uint8_t(nib << vnm::Layout::meta_shift(g));
      for (int s = 0; s < 2; ++s) {
        const int pos = s ? (nib >> 2) : (nib & 3);
        const int64_t c = g * M + h.columns[size_t(((r / L.row_block) * L.groups + g) * 4 + pos)];
        const bool real = r < L.rows && c < L.cols;
        h.values[size_t((r * L.groups + g) * 2 + s)] = real ? to_bits(t, normal(rng)) : uint16_t(0);
      }
    }
  return h;
}

template <class T>
T* device_copy(const std::vector<T>& v) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(1, v.size() * sizeof(T))));
  CUDA_OK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <class F>
float median_ms(F&& launch, int sets, int warmup, int reps, cudaStream_t s) {
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) launch(i % sets);
  std::vector<float> times;
  for (int i = 0; i < reps; ++i) {
    CUDA_OK(cudaEventRecord(a, s));
    launch(i % sets);
    CUDA_OK(cudaEventRecord(b, s));
    CUDA_OK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, a, b));
    times.push_back(ms);
  }
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string dtype_s = "f16", shapes_s = "default", tokens_s = "1,16,128,2048,8192";
  std::string patterns_s = "2:4,64:2:5,64:2:8,128:2:8,64:2:16,128:2:16";
  int warmup = 10, reps = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--dtype") dtype_s = next();
    else if (a == "--shapes") shapes_s = next();
    else if (a == "--tokens") tokens_s = next();
    else if (a == "--patterns") patterns_s = next();
    else if (a == "--warmup") warmup = std::atoi(next().c_str());
    else if (a == "--reps") reps = std::atoi(next().c_str());
    else {
      std::fprintf(stderr,
                   "usage: %s [--dtype f16|bf16] [--shapes default|all|RxK,...] [--tokens 1,16,...] "
                   "[--patterns 2:4,64:2:8,...] [--warmup N] [--reps N]\n",
                   argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  const vnm::DType t = dtype_s == "bf16" ? vnm::DType::bf16 : vnm::DType::f16;
  const cudaDataType_t cu_t = t == vnm::DType::bf16 ? CUDA_R_16BF : CUDA_R_16F;

  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, device));
  const double l2 = double(prop.l2CacheSize);
  std::printf("# GPU: %s (sm_%d%d, %d SMs, L2 %.0f MB); dtype %s; warmup %d, median of %d; "
              "buffers rotated past 2x L2\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, l2 / 1e6,
              vnm::dtype_name(t), warmup, reps);
  std::printf("# TFLOP/s: dense-equivalent = 2 N R K / t; actual = 2 N R K (2/M) / t. GB/s: weights "
              "(packed or dense) + x + y.\n");
  std::printf("%-14s %6s %6s %5s %-9s %5s %10s %10s %8s %9s %9s %9s %9s %9s\n", "shape", "R", "K",
              "N", "pattern", "kern", "ms_vnm", "ms_cublas", "speedup", "TF_deq", "TF_act",
              "GB/s_vnm", "GB/s_cub", "rel_err");

  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cublasHandle_t handle;
  CUBLAS_OK(cublasCreate(&handle));
  CUBLAS_OK(cublasSetStream(handle, stream));
  std::mt19937 rng(1234);
  const float alpha = 1.0f, beta = 0.0f;

  for (const Shape& sh : shapes_for(shapes_s)) {
    for (const std::string& pat : split(patterns_s)) {
      const vnm::Pattern p = vnm::Pattern::parse(pat);
      const vnm::Layout L(p, sh.R, sh.K);
      const vnm::sp::PackedGeom g = vnm::packed_geom(L);
      const HostStorage h = random_storage(L, t, rng);
      uint16_t* d_values = device_copy(h.values);
      uint8_t* d_meta = device_copy(h.meta);
      uint8_t* d_columns = device_copy(h.columns);
      const size_t packed_bytes = size_t(g.values_count()) * 2 + size_t(g.meta_words()) * 4 +
                                  size_t(g.kidx_count()) * 4;
      const size_t dense_bytes = size_t(sh.R * sh.K) * 2;
      const int64_t max_n = [&] {
        int64_t m = 0;
        for (const std::string& n : split(tokens_s)) m = std::max<int64_t>(m, std::atoll(n.c_str()));
        return m;
      }();
      // Weight copies: enough that one pass over them exceeds 2x L2 (at most 8).
      const int wsets = int(std::min<double>(8, std::max<double>(1, std::ceil(2 * l2 / double(dense_bytes)))));
      std::vector<uint16_t*> vp(static_cast<size_t>(wsets)), dense(static_cast<size_t>(wsets));
      std::vector<uint32_t*> mp(static_cast<size_t>(wsets));
      std::vector<int32_t*> kx(static_cast<size_t>(wsets));
      for (int s = 0; s < wsets; ++s) {
        CUDA_OK(cudaMalloc(&vp[size_t(s)], size_t(g.values_count()) * 2));
        CUDA_OK(cudaMalloc(&mp[size_t(s)], size_t(g.meta_words()) * 4));
        CUDA_OK(cudaMalloc(&kx[size_t(s)], size_t(g.kidx_count()) * 4));
        CUDA_OK(cudaMalloc(&dense[size_t(s)], dense_bytes));
        vnm::cuda::PackParams pk;
        pk.geom = g;
        pk.values = d_values;
        pk.meta = d_meta;
        pk.columns = d_columns;
        pk.values_p = vp[size_t(s)];
        pk.meta_p = mp[size_t(s)];
        pk.kidx = kx[size_t(s)];
        pk.device = device;
        pk.stream = stream;
        VNM_OK(vnm::cuda::pack(pk));
        CUDA_OK(cudaMemsetAsync(dense[size_t(s)], 0, dense_bytes, stream));
        vnm::cuda::DenseParams dp;
        dp.geom = g;
        dp.values_p = vp[size_t(s)];
        dp.meta_p = mp[size_t(s)];
        dp.kidx = kx[size_t(s)];
        dp.dense = dense[size_t(s)];
        dp.device = device;
        dp.stream = stream;
        VNM_OK(vnm::cuda::packed_to_dense(dp));
      }
      // Activation / output copies for the largest N, reused (as prefixes) for smaller N.
      const size_t x_bytes = size_t(max_n * sh.K) * 2, y_bytes = size_t(max_n * sh.R) * 2;
      const int xsets = int(std::min<double>(8, std::max<double>(2, std::ceil(2 * l2 / double(x_bytes + y_bytes)))));
      std::vector<uint16_t*> xs(static_cast<size_t>(xsets)), ys(static_cast<size_t>(xsets)), yref(1);
      {
        std::vector<uint16_t> hx(static_cast<size_t>(max_n * sh.K));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (auto& v : hx) v = to_bits(t, normal(rng));
        for (int s = 0; s < xsets; ++s) {
          xs[size_t(s)] = device_copy(hx);
          CUDA_OK(cudaMalloc(&ys[size_t(s)], y_bytes));
        }
        CUDA_OK(cudaMalloc(&yref[0], y_bytes));
      }

      for (const std::string& n_s : split(tokens_s)) {
        const int64_t N = std::atoll(n_s.c_str());
        vnm::cuda::SpmmParams q;
        q.geom = g;
        q.dtype = int(t);
        q.n_tokens = N;
        q.ldx = sh.K;
        q.ldy = sh.R;
        q.device = device;
        q.stream = stream;
        const int sets = std::max(wsets, xsets);
        auto ours = [&](int s) {
          q.values_p = vp[size_t(s % wsets)];
          q.meta_p = mp[size_t(s % wsets)];
          q.kidx = kx[size_t(s % wsets)];
          q.x = xs[size_t(s % xsets)];
          q.y = ys[size_t(s % xsets)];
          VNM_OK(vnm::cuda::spmm(q));
        };
        auto cublas = [&](int s, uint16_t* y) {
          // y^T (R x N, column-major) = W (R x K row-major = K x R column-major, transposed) x^T
          CUBLAS_OK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(sh.R), int(N), int(sh.K), &alpha,
                                 dense[size_t(s % wsets)], cu_t, int(sh.K), xs[size_t(s % xsets)], cu_t,
                                 int(sh.K), &beta, y, cu_t, int(sh.R), CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
        };
        // Correctness first: set 0 of both against each other.
        CUDA_OK(cudaMemsetAsync(ys[0], 0xFF, y_bytes, stream));  // NaN poison
        ours(0);
        cublas(0, yref[0]);
        CUDA_OK(cudaStreamSynchronize(stream));
        std::vector<uint16_t> h_ours(static_cast<size_t>(N * sh.R)), h_ref(static_cast<size_t>(N * sh.R));
        CUDA_OK(cudaMemcpy(h_ours.data(), ys[0], h_ours.size() * 2, cudaMemcpyDeviceToHost));
        CUDA_OK(cudaMemcpy(h_ref.data(), yref[0], h_ref.size() * 2, cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (size_t i = 0; i < h_ours.size(); ++i) {
          const double a = from_bits(t, h_ours[i]), b = from_bits(t, h_ref[i]);
          num += (a - b) * (a - b);
          den += b * b;
        }
        const double err = std::sqrt(num / std::max(den, 1e-300));  // NaN if anything unwritten

        const float ms_v = median_ms(ours, sets, warmup, reps, stream);
        const float ms_c = median_ms([&](int s) { cublas(s, ys[size_t(s % xsets)]); }, sets, warmup,
                                     reps, stream);
        const vnm::cuda::Plan pl = vnm::cuda::plan(q);
        char kern[16];
        std::snprintf(kern, sizeof(kern), "%s%d%s", pl.path == 1 ? "d" : "t", pl.bm,
                      pl.contiguous_b ? "c" : "g");
        const double flops = 2.0 * double(N) * double(sh.R) * double(sh.K);
        const double io = double(N) * double(sh.K + sh.R) * 2.0;
        std::printf("%-14s %6lld %6lld %5lld %-9s %5s %10.4f %10.4f %8.2f %9.1f %9.1f %9.0f %9.0f %9.2e\n",
                    sh.name, (long long)sh.R, (long long)sh.K, (long long)N, pat.c_str(), kern,
                    ms_v, ms_c, ms_c / ms_v, flops / (ms_v * 1e9), flops * (2.0 / p.M) / (ms_v * 1e9),
                    (double(packed_bytes) + io) / (ms_v * 1e6), (double(dense_bytes) + io) / (ms_c * 1e6),
                    err);
        std::fflush(stdout);
      }
      for (int s = 0; s < wsets; ++s) {
        cudaFree(vp[size_t(s)]);
        cudaFree(mp[size_t(s)]);
        cudaFree(kx[size_t(s)]);
        cudaFree(dense[size_t(s)]);
      }
      for (int s = 0; s < xsets; ++s) {
        cudaFree(xs[size_t(s)]);
        cudaFree(ys[size_t(s)]);
      }
      cudaFree(yref[0]);
      cudaFree(d_values);
      cudaFree(d_meta);
      cudaFree(d_columns);
    }
  }
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return 0;
}
