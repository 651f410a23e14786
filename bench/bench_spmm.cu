// vnm_bench_spmm: the V:N:M SpMM kernels against cuBLAS dense (cublasGemmEx, fp32 accumulate)
// on the shapes and patterns of DESIGN.md section 5.
//
//   vnm_bench_spmm [--dtype f16|bf16] [--shapes default|llama7b|all|RxK,RxK...] [--tokens 1,16,...]
//                  [--patterns 2:4,64:2:8,...] [--warmup 10] [--reps 15] [--batch-ms 2]
//                  [--max-copies 2048] [--rotate-cap-gb 16] [--no-graph]
//
// Weights are random valid V:N:M storage (columns, values and metadata drawn directly, no mask
// search), packed on the GPU; cuBLAS multiplies the same weight densified. Each (shape, pattern,
// N) first checks our y (into a NaN-poisoned buffer) against cuBLAS, then times both.
//
// L2: each weight operand gets its own number of copies, sized from its own bytes (the packed
// arrays for ours, the dense matrix for cuBLAS): the fewest whose rotation set exceeds twice the
// L2 size the device reports, within --max-copies and --rotate-cap-gb per operand (the per-shape
// line says what each got; a set that stays under 2x L2 is flagged). x / y have 2 to 8 copies.
//
// Timing: a CUDA graph of `calls` launches cycling through all copies is captured; each of --reps
// timed batches is as many back-to-back replays as last about --batch-ms, between a pair of CUDA
// events; the figure is the median per launch. With a graph no host-side work (argument checks,
// cuBLAS heuristics) falls inside the events. Where capture fails (or with --no-graph) a batch is
// the `calls` launches enqueued directly between the events: host work then overlaps the GPU's,
// but can still bound launches shorter than it. The `how` column says which (g: graph, s:
// stream; ours/cuBLAS).
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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
  if (which == "llama7b") return llama7b;
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

// Copies of one operand: the fewest whose total exceeds 2x L2 (so cycling through them reads
// device memory, not L2), at least `minimum`, at most `max_copies` and `cap_bytes` in all.
int rotation_copies(double one_copy_bytes, double l2_bytes, int max_copies, double cap_bytes,
                    int minimum = 1) {
  const double want = std::max<double>(minimum, std::floor(2 * l2_bytes / one_copy_bytes) + 1);
  const double fit = std::max(1.0, std::floor(cap_bytes / one_copy_bytes));
  return int(std::max(1.0, std::min({want, double(max_copies), fit})));
}

// One call of a timed operation on copy i (each operand picks i % its copy count). Returns false,
// after saying why on stderr, when the call fails.
using Launch = std::function<bool(int)>;

struct Timing {
  float ms = 0;     // median per launch
  char how = '?';   // 'g' graph replays, 's' launches enqueued directly between the events
  int calls = 0;    // launches per timed batch
};

float elapsed_ms(cudaEvent_t a, cudaEvent_t b) {
  CUDA_OK(cudaEventSynchronize(b));
  float ms = 0;
  CUDA_OK(cudaEventElapsedTime(&ms, a, b));
  return ms;
}

float median(std::vector<float> v) {
  std::nth_element(v.begin(), v.begin() + long(v.size() / 2), v.end());
  return v[v.size() / 2];
}

// Warm-up touches every copy (first touch, cuBLAS heuristics); one direct batch over the copies
// estimates a launch, which sets `calls` (a multiple of `copies`, about batch_ms of work). Then
// `reps` timed batches: back-to-back replays of a graph of `calls` launches (about batch_ms), or
// without a graph, `calls` launches enqueued directly.
Timing time_per_launch(const Launch& launch, int copies, int warmup, int reps, double batch_ms,
                       bool use_graph, cudaStream_t s) {
  auto enqueue = [&](int n) {
    for (int i = 0; i < n; ++i)
      if (!launch(i)) std::exit(2);
  };
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  enqueue(std::max(warmup, copies));
  CUDA_OK(cudaStreamSynchronize(s));
  CUDA_OK(cudaEventRecord(a, s));
  enqueue(copies);
  CUDA_OK(cudaEventRecord(b, s));
  const double est = std::max(1e-4, double(elapsed_ms(a, b)) / copies);
  Timing t;
  t.calls = copies * std::max(1, int(std::ceil(batch_ms / est / copies)));
  t.calls = std::min(t.calls, std::max(copies, 4096));
  std::vector<float> times;
  if (use_graph) {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
      bool launched = true;
      for (int i = 0; launched && i < t.calls; ++i) launched = launch(i);
      const cudaError_t ended = cudaStreamEndCapture(s, &graph);  // ends capture in every case
      if (launched && ended == cudaSuccess && graph != nullptr &&
          cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess) {
        CUDA_OK(cudaGraphLaunch(exec, s));  // the first replay uploads the graph
        CUDA_OK(cudaEventRecord(a, s));
        CUDA_OK(cudaGraphLaunch(exec, s));
        CUDA_OK(cudaEventRecord(b, s));
        // Back-to-back replays per timed batch, about batch_ms in all: the gap between the
        // event and the first kernel is then a small part of what is timed.
        const int replays = std::max(1, int(std::ceil(batch_ms / std::max(1e-3, double(elapsed_ms(a, b))))));
        for (int r = 0; r < reps; ++r) {
          CUDA_OK(cudaEventRecord(a, s));
          for (int k = 0; k < replays; ++k) CUDA_OK(cudaGraphLaunch(exec, s));
          CUDA_OK(cudaEventRecord(b, s));
          times.push_back(elapsed_ms(a, b) / float(replays * t.calls));
        }
        t.how = 'g';
      }
    }
    if (exec != nullptr) CUDA_OK(cudaGraphExecDestroy(exec));
    if (graph != nullptr) CUDA_OK(cudaGraphDestroy(graph));
    if (t.how != 'g') {
      const cudaError_t e = cudaGetLastError();  // clears the capture's error for later calls
      std::printf("# graph capture failed (%s): timing direct batches\n", cudaGetErrorString(e));
    }
  }
  if (t.how != 'g') {
    for (int r = 0; r < reps; ++r) {
      CUDA_OK(cudaEventRecord(a, s));
      enqueue(t.calls);
      CUDA_OK(cudaEventRecord(b, s));
      times.push_back(elapsed_ms(a, b) / float(t.calls));
    }
    t.how = 's';
  }
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  t.ms = median(times);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dtype_s = "f16", shapes_s = "default", tokens_s = "1,16,128,2048,8192";
  std::string patterns_s = "2:4,64:2:5,64:2:8,128:2:8,64:2:16,128:2:16";
  int warmup = 10, reps = 15, max_copies = 2048;
  double batch_ms = 2.0, cap_gb = 16.0;
  bool use_graph = true;
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
    else if (a == "--batch-ms") batch_ms = std::atof(next().c_str());
    else if (a == "--max-copies") max_copies = std::atoi(next().c_str());
    else if (a == "--rotate-cap-gb") cap_gb = std::atof(next().c_str());
    else if (a == "--no-graph") use_graph = false;
    else {
      std::fprintf(stderr,
                   "usage: %s [--dtype f16|bf16] [--shapes default|llama7b|all|RxK,...] "
                   "[--tokens 1,16,...] [--patterns 2:4,64:2:8,...] [--warmup N] [--reps N] "
                   "[--batch-ms MS] [--max-copies N] [--rotate-cap-gb GB] [--no-graph]\n",
                   argv[0]);
      return a == "--help" ? 0 : 2;
    }
  }
  if (dtype_s != "f16" && dtype_s != "bf16") {
    std::fprintf(stderr, "--dtype %s: want f16 or bf16\n", dtype_s.c_str());
    return 2;
  }
  if (reps < 1 || max_copies < 1 || !(batch_ms > 0) || !(cap_gb > 0)) {
    std::fprintf(stderr, "--reps, --max-copies, --batch-ms and --rotate-cap-gb must be positive\n");
    return 2;
  }
  const vnm::DType t = dtype_s == "bf16" ? vnm::DType::bf16 : vnm::DType::f16;
  const cudaDataType_t cu_t = t == vnm::DType::bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const double cap = cap_gb * 1e9;

  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, device));
  const double l2 = double(prop.l2CacheSize);
  std::printf("# GPU: %s (sm_%d%d, %d SMs, L2 %.0f MB); dtype %s; per launch: median of %d batches "
              "of about %.1f ms (%s); weight copies per operand past 2x L2 (at most %d, %.0f GB)\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount, l2 / 1e6,
              vnm::dtype_name(t), reps, batch_ms, use_graph ? "CUDA graph replays" : "direct launches",
              max_copies, cap_gb);
  std::printf("# TFLOP/s: dense-equivalent = 2 N R K / t; actual = 2 N R K (2/M) / t. GB/s: weights "
              "(packed or dense) + x + y.\n");

  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cublasHandle_t handle;
  CUBLAS_OK(cublasCreate(&handle));
  CUBLAS_OK(cublasSetStream(handle, stream));
  // An explicit workspace (after cublasSetStream, which resets it): cuBLAS then allocates
  // nothing while a graph is captured. 32 MiB is what NVIDIA suggests for Hopper.
  const size_t cublas_ws_bytes = size_t(32) << 20;
  void* cublas_ws = nullptr;
  CUDA_OK(cudaMalloc(&cublas_ws, cublas_ws_bytes));
  CUBLAS_OK(cublasSetWorkspace(handle, cublas_ws, cublas_ws_bytes));
  std::mt19937 rng(1234);
  const float alpha = 1.0f, beta = 0.0f;
  int failures = 0;

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
      // Each operand's copies from its own bytes: packed (ours) and dense (cuBLAS) differ by M/2.
      const int nv = rotation_copies(double(packed_bytes), l2, max_copies, cap);
      const int nd = rotation_copies(double(dense_bytes), l2, max_copies, cap);
      std::vector<uint16_t*> vp(static_cast<size_t>(nv)), dense(static_cast<size_t>(nd));
      std::vector<uint32_t*> mp(static_cast<size_t>(nv));
      std::vector<int32_t*> kx(static_cast<size_t>(nv));
      for (int s = 0; s < nv; ++s) {
        CUDA_OK(cudaMalloc(&vp[size_t(s)], size_t(g.values_count()) * 2));
        CUDA_OK(cudaMalloc(&mp[size_t(s)], size_t(g.meta_words()) * 4));
        CUDA_OK(cudaMalloc(&kx[size_t(s)], size_t(g.kidx_count()) * 4));
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
      }
      for (int s = 0; s < nd; ++s) {  // the same weight, densified
        CUDA_OK(cudaMalloc(&dense[size_t(s)], dense_bytes));
        CUDA_OK(cudaMemsetAsync(dense[size_t(s)], 0, dense_bytes, stream));
        vnm::cuda::DenseParams dp;
        dp.geom = g;
        dp.values_p = vp[0];
        dp.meta_p = mp[0];
        dp.kidx = kx[0];
        dp.dense = dense[size_t(s)];
        dp.device = device;
        dp.stream = stream;
        VNM_OK(vnm::cuda::packed_to_dense(dp));
      }
      // Activation / output copies for the largest N, reused (as prefixes) for smaller N.
      const size_t x_bytes = size_t(max_n * sh.K) * 2, y_bytes = size_t(max_n * sh.R) * 2;
      const int xsets = rotation_copies(double(x_bytes + y_bytes), l2, 8, cap, 2);
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
      const double rot_v = nv * double(packed_bytes), rot_d = nd * double(dense_bytes);
      const bool cold = rot_v > 2 * l2 && rot_d > 2 * l2;
      std::printf("# %s %lldx%lld %s: rotation sets: ours %d x %.2f MB = %.0f MB, cuBLAS %d x %.1f MB = "
                  "%.0f MB, x/y %d copies%s\n",
                  sh.name, (long long)sh.R, (long long)sh.K, pat.c_str(), nv, packed_bytes / 1e6,
                  rot_v / 1e6, nd, dense_bytes / 1e6, rot_d / 1e6, xsets,
                  cold ? "" : "; NOT past 2x L2 (raise --max-copies / --rotate-cap-gb)");
      std::printf("%-14s %6s %6s %5s %-9s %5s %10s %10s %8s %9s %9s %9s %9s %9s %4s\n", "shape", "R",
                  "K", "N", "pattern", "kern", "ms_vnm", "ms_cublas", "speedup", "TF_deq", "TF_act",
                  "GB/s_vnm", "GB/s_cub", "rel_err", "how");

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
        auto ours_into = [&](int s, uint16_t* y) {
          q.values_p = vp[size_t(s % nv)];
          q.meta_p = mp[size_t(s % nv)];
          q.kidx = kx[size_t(s % nv)];
          q.x = xs[size_t(s % xsets)];
          q.y = y;
          const int st = vnm::cuda::spmm(q);
          if (st != vnm::cuda::kOk)
            std::fprintf(stderr, "vnm::cuda::spmm: status %d: %s\n", st, vnm::cuda::last_error());
          return st == vnm::cuda::kOk;
        };
        auto cublas_into = [&](int s, uint16_t* y) {
          // y^T (R x N, column-major) = W (R x K row-major = K x R column-major, transposed) x^T
          const cublasStatus_t st = cublasGemmEx(
              handle, CUBLAS_OP_T, CUBLAS_OP_N, int(sh.R), int(N), int(sh.K), &alpha,
              dense[size_t(s % nd)], cu_t, int(sh.K), xs[size_t(s % xsets)], cu_t, int(sh.K), &beta, y,
              cu_t, int(sh.R), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
          if (st != CUBLAS_STATUS_SUCCESS) std::fprintf(stderr, "cublasGemmEx: status %d\n", int(st));
          return st == CUBLAS_STATUS_SUCCESS;
        };
        // Correctness first: copy 0 of both on x copy 0, ours into a NaN-poisoned buffer.
        CUDA_OK(cudaMemsetAsync(ys[0], 0xFF, y_bytes, stream));
        if (!ours_into(0, ys[0]) || !cublas_into(0, yref[0])) return 2;
        CUDA_OK(cudaStreamSynchronize(stream));
        CUDA_OK(cudaGetLastError());
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
        if (!(err < 1e-2)) {
          std::printf("%-14s %6lld %6lld %5lld %-9s  FAIL: rel_err %.2e against cuBLAS (not timed)\n",
                      sh.name, (long long)sh.R, (long long)sh.K, (long long)N, pat.c_str(), err);
          ++failures;
          continue;
        }

        const Timing tv = time_per_launch([&](int s) { return ours_into(s, ys[size_t(s % xsets)]); },
                                          std::max(nv, xsets), warmup, reps, batch_ms, use_graph, stream);
        const Timing tc = time_per_launch([&](int s) { return cublas_into(s, ys[size_t(s % xsets)]); },
                                          std::max(nd, xsets), warmup, reps, batch_ms, use_graph, stream);
        const vnm::cuda::Plan pl = vnm::cuda::plan(q);
        char kern[16];
        std::snprintf(kern, sizeof(kern), "%s%d%s", pl.path == 1 ? "d" : "t", pl.bm,
                      pl.contiguous_b ? "c" : "g");
        const double flops = 2.0 * double(N) * double(sh.R) * double(sh.K);
        const double io = double(N) * double(sh.K + sh.R) * 2.0;
        std::printf("%-14s %6lld %6lld %5lld %-9s %5s %10.4f %10.4f %8.2f %9.1f %9.1f %9.0f %9.0f %9.2e  %c/%c\n",
                    sh.name, (long long)sh.R, (long long)sh.K, (long long)N, pat.c_str(), kern,
                    tv.ms, tc.ms, tc.ms / tv.ms, flops / (tv.ms * 1e9), flops * (2.0 / p.M) / (tv.ms * 1e9),
                    (double(packed_bytes) + io) / (tv.ms * 1e6), (double(dense_bytes) + io) / (tc.ms * 1e6),
                    err, tv.how, tc.how);
        std::fflush(stdout);
      }
      for (int s = 0; s < nv; ++s) {
        CUDA_OK(cudaFree(vp[size_t(s)]));
        CUDA_OK(cudaFree(mp[size_t(s)]));
        CUDA_OK(cudaFree(kx[size_t(s)]));
      }
      for (int s = 0; s < nd; ++s) CUDA_OK(cudaFree(dense[size_t(s)]));
      for (int s = 0; s < xsets; ++s) {
        CUDA_OK(cudaFree(xs[size_t(s)]));
        CUDA_OK(cudaFree(ys[size_t(s)]));
      }
      CUDA_OK(cudaFree(yref[0]));
      CUDA_OK(cudaFree(d_values));
      CUDA_OK(cudaFree(d_meta));
      CUDA_OK(cudaFree(d_columns));
    }
  }
  CUBLAS_OK(cublasDestroy(handle));
  CUDA_OK(cudaFree(cublas_ws));
  CUDA_OK(cudaStreamDestroy(stream));
  if (failures) {
    std::fprintf(stderr, "%d correctness failure(s) against cuBLAS\n", failures);
    return 1;
  }
  return 0;
}
