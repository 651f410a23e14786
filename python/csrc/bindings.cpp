// Thin nanobind bindings of the C++ core (module vnm._C).
//
// Arrays cross as DLPack ndarrays (torch tensors, no libtorch link). Weights and activations of
// 16-bit types cross as raw bits (the Python side passes tensor.view(torch.int16)) with a dtype
// code; masks as uint8. Python allocates every output; these functions only check that sizes
// agree with the format's Layout and call the core with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/tuple.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "vnm/core.h"
#include "vnm/format.h"
#include "vnm/mma_model.h"
#include "vnm/pack.h"
#include "vnm/parallel.h"
#include "vnm/permute.h"

#ifdef VNM_WITH_CUDA
#include "vnm/cuda.h"
#endif

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using Any = nb::ndarray<nb::device::cpu, nb::c_contig>;
using U8 = nb::ndarray<uint8_t, nb::device::cpu, nb::c_contig>;
using F32 = nb::ndarray<float, nb::device::cpu, nb::c_contig>;
using I32 = nb::ndarray<int32_t, nb::device::cpu, nb::c_contig>;
using I64 = nb::ndarray<int64_t, nb::device::cpu, nb::c_contig>;

vnm::DType to_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  return static_cast<vnm::DType>(code);
}

// Checks that `a` holds `count` elements of `itemsize` bytes.
template <typename A>
void expect(const A& a, int64_t count, size_t itemsize, const char* what) {
  if (int64_t(a.size()) != count || a.itemsize() != itemsize)
    throw std::invalid_argument(std::string("internal: ") + what + " has " +
                                std::to_string(a.size()) + " elements of " +
                                std::to_string(a.itemsize()) + " bytes, expected " +
                                std::to_string(count) + " of " + std::to_string(itemsize));
}

void expect_storage(const vnm::Layout& L, vnm::DType t, const Any& values, const U8& meta,
                    const U8& columns) {
  expect(values, L.values_count(), size_t(vnm::dtype_size(t)), "values");
  expect(meta, L.meta_bytes(), 1, "meta");
  expect(columns, L.columns_bytes(), 1, "columns");
}

const int32_t* optional_i32(const I32& a, int64_t count, const char* what) {
  if (!a.is_valid()) return nullptr;
  expect(a, count, 4, what);
  return a.data();
}

// optional_i32 for an index array the core writes or reads through (perm, row_perm): it must be
// a permutation of 0..count-1, or a bad call would touch memory out of bounds.
const int32_t* optional_perm(const I32& a, int64_t count, const char* what) {
  const int32_t* p = optional_i32(a, count, what);
  if (!p) return nullptr;
  std::vector<bool> seen(size_t(count), false);
  for (int64_t i = 0; i < count; ++i) {
    if (p[i] < 0 || p[i] >= count || seen[size_t(p[i])])
      throw std::invalid_argument(std::string(what) + " is not a permutation of 0.." +
                                  std::to_string(count - 1));
    seen[size_t(p[i])] = true;
  }
  return p;
}

const void* optional_any(const Any& a, int64_t count, vnm::DType t, const char* what) {
  if (!a.is_valid()) return nullptr;
  expect(a, count, size_t(vnm::dtype_size(t)), what);
  return a.data();
}

vnm::DType to_dtype16(int code) {
  const vnm::DType t = to_dtype(code);
  if (t == vnm::DType::f32)
    throw nb::type_error("the packed (mma.sp) layout holds float16 or bfloat16 values; cast the "
                         "weight with .half() or .bfloat16() first");
  return t;
}

// Geometry of the packed form, checked against the canonical layout rules.
vnm::sp::PackedGeom geom_of(const vnm::Pattern& p, int64_t R, int64_t K) {
  return vnm::packed_geom(vnm::Layout(p, R, K));
}

template <typename A>
void expect_packed(const vnm::sp::PackedGeom& g, const A& values_p, const A& meta_p,
                   const A& kidx) {
  expect(values_p, g.values_count(), 2, "packed values");
  expect(meta_p, g.meta_words(), 4, "packed meta");
  expect(kidx, g.kidx_count(), 4, "packed kidx");
}

}  // namespace

#ifdef VNM_WITH_CUDA
namespace {

// CUDA tensors cross as DLPack capsules made with __dlpack__(stream=-1): no synchronisation with
// the legacy default stream, so launches stay on the caller's stream and inside CUDA graphs.
using Cuda = nb::ndarray<nb::device::cuda, nb::c_contig>;

// Turns a vnm::cuda status into the Python exception that names the fix.
void check_status(int st) {
  if (st == vnm::cuda::kOk) return;
  const std::string msg = vnm::cuda::last_error();
  switch (st) {
    case vnm::cuda::kUnsupportedDtype: throw nb::type_error(msg.c_str());
    case vnm::cuda::kInvalidArgument:
    case vnm::cuda::kMisaligned: throw std::invalid_argument(msg);
    default: throw std::runtime_error(msg);
  }
}

template <typename A>
const void* cuda_ptr(const A& a, int device, const char* what) {
  if (a.device_id() != device)
    throw std::invalid_argument(std::string(what) + " is on cuda:" + std::to_string(a.device_id()) +
                                ", the others on cuda:" + std::to_string(device));
  return a.data();
}

void bind_cuda(nb::module_& m) {
  m.def("cuda_device_count", &vnm::cuda::device_count, "CUDA devices visible to vnm's kernels.");

  m.def("cuda_spmm", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype,
                        const Cuda& values_p, const Cuda& meta_p, const Cuda& kidx, bool has_perm,
                        const Cuda& out_rows, const Cuda& x, int64_t n_tokens, const Cuda& bias,
                        Cuda y, int device, uintptr_t stream, int path, bool force_gather,
                        const Cuda& xt, int64_t ldxt, const Cuda& workspace,
                        int64_t decode_splits) {
    vnm::cuda::SpmmParams q;
    q.geom = geom_of(p, R, K);
    q.dtype = dtype;
    expect_packed(q.geom, values_p, meta_p, kidx);
    expect(x, n_tokens * K, 2, "x");
    expect(y, n_tokens * R, 2, "y");
    q.values_p = cuda_ptr(values_p, device, "packed values");
    q.meta_p = static_cast<const uint32_t*>(cuda_ptr(meta_p, device, "packed meta"));
    q.kidx = static_cast<const int32_t*>(cuda_ptr(kidx, device, "packed kidx"));
    q.has_perm = has_perm;
    if (out_rows.is_valid()) {  // a permutation: checked when the VNMTensor was built
      expect(out_rows, R, 4, "out_rows");
      q.out_rows = static_cast<const int32_t*>(cuda_ptr(out_rows, device, "out_rows"));
    }
    q.x = cuda_ptr(x, device, "x");
    q.n_tokens = n_tokens;
    q.ldx = K;
    if (bias.is_valid()) {
      expect(bias, R, 2, "bias");
      q.bias = cuda_ptr(bias, device, "bias");
    }
    q.y = const_cast<void*>(cuda_ptr(y, device, "y"));
    q.ldy = R;
    q.device = device;
    q.stream = reinterpret_cast<void*>(stream);
    q.path = path;
    q.force_gather = force_gather;
    if (xt.is_valid()) {  // x transposed (K x ldxt) for the tiled kernel's gathered path
      expect(xt, K * ldxt, 2, "xt");
      q.xt = cuda_ptr(xt, device, "xt");
      q.ldxt = ldxt;
    }
    if (workspace.is_valid()) {  // fp32 split-K scratch (sp::spmm_workspace_floats)
      if (workspace.dtype() != nb::dtype<float>())
        throw nb::type_error("the decode split-K workspace must be torch.float32");
      q.workspace = static_cast<float*>(const_cast<void*>(cuda_ptr(workspace, device, "workspace")));
      q.workspace_floats = int64_t(workspace.size());
    }
    q.decode_splits = decode_splits;
    int st;
    {
      nb::gil_scoped_release release;
      st = vnm::cuda::spmm(q);
    }
    check_status(st);
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "has_perm"_a,
        "out_rows"_a.none(), "x"_a, "n_tokens"_a, "bias"_a.none(), "y"_a, "device"_a, "stream"_a,
        "path"_a = 0, "force_gather"_a = false, "xt"_a.none() = nb::none(), "ldxt"_a = 0,
        "workspace"_a.none() = nb::none(), "decode_splits"_a = 0,
        "y = x @ W^T (+ bias) on the GPU from the packed arrays; xt: x transposed, K x ldxt, "
        "where cuda_plan says the kernel needs it; workspace: float32 scratch of "
        "_spmm_workspace_floats floats (None: allocated on the stream when needed).");

  m.def("cuda_plan", [](const vnm::Pattern& p, int64_t R, int64_t K, int64_t n_tokens,
                        bool has_perm, int path, bool force_gather, bool x_aligned16) {
    vnm::cuda::SpmmParams q;
    q.geom = geom_of(p, R, K);
    q.n_tokens = n_tokens;
    q.has_perm = has_perm;
    q.ldx = K;
    q.path = path;
    q.force_gather = force_gather;
    alignas(16) static const unsigned char dummy[18] = {};  // a stand-in for x
    q.x = x_aligned16 ? dummy : dummy + 2;
    const vnm::cuda::Plan pl = vnm::cuda::plan(q);
    return nb::make_tuple(pl.path, pl.bm, pl.contiguous_b, pl.transposed_x);
  }, "pattern"_a, "R"_a, "K"_a, "n_tokens"_a, "has_perm"_a, "path"_a = 0,
        "force_gather"_a = false, "x_aligned16"_a = true,
        "(path, row tile, contiguous B, needs x transposed) the dispatch picks.");

  m.def("cuda_pack", [](const vnm::Pattern& p, int64_t R, int64_t K, const Cuda& values,
                        const Cuda& meta, const Cuda& columns, const Cuda& perm, Cuda values_p,
                        Cuda meta_p, Cuda kidx, int device, uintptr_t stream) {
    const vnm::Layout L(p, R, K);
    vnm::cuda::PackParams q;
    q.geom = vnm::packed_geom(L);
    expect(values, L.values_count(), 2, "values");
    expect(meta, L.meta_bytes(), 1, "meta");
    expect(columns, L.columns_bytes(), 1, "columns");
    expect_packed(q.geom, values_p, meta_p, kidx);
    q.values = static_cast<const uint16_t*>(cuda_ptr(values, device, "values"));
    q.meta = static_cast<const uint8_t*>(cuda_ptr(meta, device, "meta"));
    q.columns = static_cast<const uint8_t*>(cuda_ptr(columns, device, "columns"));
    if (perm.is_valid()) {
      expect(perm, K, 4, "perm");
      q.perm = static_cast<const int32_t*>(cuda_ptr(perm, device, "perm"));
    }
    q.values_p = static_cast<uint16_t*>(const_cast<void*>(cuda_ptr(values_p, device, "values_p")));
    q.meta_p = static_cast<uint32_t*>(const_cast<void*>(cuda_ptr(meta_p, device, "meta_p")));
    q.kidx = static_cast<int32_t*>(const_cast<void*>(cuda_ptr(kidx, device, "kidx")));
    q.device = device;
    q.stream = reinterpret_cast<void*>(stream);
    check_status(vnm::cuda::pack(q));
  }, "pattern"_a, "R"_a, "K"_a, "values"_a, "meta"_a, "columns"_a, "perm"_a.none(),
        "values_p"_a, "meta_p"_a, "kidx"_a, "device"_a, "stream"_a);

  m.def("cuda_unpack", [](const vnm::Pattern& p, int64_t R, int64_t K, const Cuda& values_p,
                          const Cuda& meta_p, const Cuda& kidx, const Cuda& inv_perm, Cuda values,
                          Cuda meta, Cuda columns, int device, uintptr_t stream) {
    const vnm::Layout L(p, R, K);
    vnm::cuda::UnpackParams q;
    q.geom = vnm::packed_geom(L);
    expect_packed(q.geom, values_p, meta_p, kidx);
    expect(values, L.values_count(), 2, "values");
    expect(meta, L.meta_bytes(), 1, "meta");
    expect(columns, L.columns_bytes(), 1, "columns");
    q.values_p = static_cast<const uint16_t*>(cuda_ptr(values_p, device, "values_p"));
    q.meta_p = static_cast<const uint32_t*>(cuda_ptr(meta_p, device, "meta_p"));
    q.kidx = static_cast<const int32_t*>(cuda_ptr(kidx, device, "kidx"));
    if (inv_perm.is_valid()) {
      expect(inv_perm, K, 4, "inv_perm");
      q.inv_perm = static_cast<const int32_t*>(cuda_ptr(inv_perm, device, "inv_perm"));
    }
    q.values = static_cast<uint16_t*>(const_cast<void*>(cuda_ptr(values, device, "values")));
    q.meta = static_cast<uint8_t*>(const_cast<void*>(cuda_ptr(meta, device, "meta")));
    q.columns = static_cast<uint8_t*>(const_cast<void*>(cuda_ptr(columns, device, "columns")));
    q.device = device;
    q.stream = reinterpret_cast<void*>(stream);
    check_status(vnm::cuda::unpack(q));
  }, "pattern"_a, "R"_a, "K"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "inv_perm"_a.none(),
        "values"_a, "meta"_a, "columns"_a, "device"_a, "stream"_a);

  m.def("cuda_packed_to_dense", [](const vnm::Pattern& p, int64_t R, int64_t K,
                                   const Cuda& values_p, const Cuda& meta_p, const Cuda& kidx,
                                   Cuda dense, int device, uintptr_t stream) {
    vnm::cuda::DenseParams q;
    q.geom = geom_of(p, R, K);
    expect_packed(q.geom, values_p, meta_p, kidx);
    expect(dense, R * K, 2, "dense");
    q.values_p = static_cast<const uint16_t*>(cuda_ptr(values_p, device, "values_p"));
    q.meta_p = static_cast<const uint32_t*>(cuda_ptr(meta_p, device, "meta_p"));
    q.kidx = static_cast<const int32_t*>(cuda_ptr(kidx, device, "kidx"));
    q.dense = static_cast<uint16_t*>(const_cast<void*>(cuda_ptr(dense, device, "dense")));
    q.device = device;
    q.stream = reinterpret_cast<void*>(stream);
    check_status(vnm::cuda::packed_to_dense(q));
  }, "pattern"_a, "R"_a, "K"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "dense"_a, "device"_a,
        "stream"_a);
}

}  // namespace
#endif

NB_MODULE(_C, m) {
  m.doc() = "vnm C++ core: V:N:M format, mask selection, reference SpMM";

  nb::class_<vnm::Pattern>(m, "Pattern")
      .def_static("parse", &vnm::Pattern::parse, "text"_a,
                  "Parse 'V:N:M' (e.g. '64:2:8') or 'N:M' (e.g. '2:4').")
      .def_static("make", &vnm::Pattern::make, "V"_a, "N"_a, "M"_a,
                  "Pattern from numbers; V = 0 means plain N:M.")
      .def_prop_ro("V", [](const vnm::Pattern& p) -> nb::object {
        return p.V > 0 ? nb::object(nb::int_(p.V)) : nb::object(nb::none());
      }, "Rows per block (None for plain N:M).")
      .def_ro("N", &vnm::Pattern::N)
      .def_ro("M", &vnm::Pattern::M)
      .def_prop_ro("density", &vnm::Pattern::density)
      .def_prop_ro("sparsity", &vnm::Pattern::sparsity)
      .def_prop_ro("is_vnm", &vnm::Pattern::is_vnm)
      .def_prop_ro("compressible", &vnm::Pattern::compressible,
                   "Whether weights can be stored in this pattern (V:N:M or 2:4).")
      .def_prop_ro("row_block", &vnm::Pattern::row_block,
                   "Rows that share selected columns in storage (V; 16 for 2:4).")
      .def("__str__", &vnm::Pattern::str)
      .def("__repr__", [](const vnm::Pattern& p) { return "Pattern('" + p.str() + "')"; })
      .def("__eq__", [](const vnm::Pattern& a, const vnm::Pattern& b) { return a == b; })
      .def("__eq__", [](const vnm::Pattern& a, const std::string& text) {
        // Pattern.parse("2:4") == "2:4", as hash() already agrees (it hashes the text)
        try {
          return a == vnm::Pattern::parse(text);
        } catch (const std::invalid_argument&) {
          return false;
        }
      })
      .def("__eq__", [](const vnm::Pattern&, nb::handle) { return false; })
      .def("__hash__", [](const vnm::Pattern& p) { return nb::hash(nb::str(p.str().c_str())); })
      .def("__getstate__", [](const vnm::Pattern& p) { return p.str(); })
      .def("__setstate__", [](vnm::Pattern& p, const std::string& s) {
        new (&p) vnm::Pattern(vnm::Pattern::parse(s));
      });

  m.def("layout", [](const vnm::Pattern& p, int64_t R, int64_t K) {
    vnm::Layout L(p, R, K);
    nb::dict d;
    d["row_block"] = L.row_block;
    d["padded_rows"] = L.padded_rows;
    d["row_blocks"] = L.row_blocks;
    d["groups"] = L.groups;
    d["padded_cols"] = L.padded_cols;
    d["meta_cols"] = L.meta_cols;
    return d;
  }, "pattern"_a, "R"_a, "K"_a, "Storage geometry of an R x K matrix (see format.h).");

  m.def("check_mask", [](const U8& mask, int64_t R, int64_t K, const vnm::Pattern& p) {
    expect(mask, R * K, 1, "mask");
    return vnm::check_mask(mask.data(), R, K, p);
  }, "mask"_a, "R"_a, "K"_a, "pattern"_a, nb::call_guard<nb::gil_scoped_release>());

  m.def("select_mask", [](const F32& scores, int64_t R, int64_t K, const vnm::Pattern& p, U8 out) {
    expect(scores, R * K, 4, "scores");
    expect(out, R * K, 1, "mask");
    vnm::select_mask(scores.data(), R, K, p, out.data());
  }, "scores"_a, "R"_a, "K"_a, "pattern"_a, "out"_a, nb::call_guard<nb::gil_scoped_release>());

  m.def("find_nonfinite_kept", [](const Any& weight, int dtype, const U8& mask, int64_t R,
                                  int64_t K) {
    const vnm::DType t = to_dtype(dtype);
    expect(weight, R * K, size_t(vnm::dtype_size(t)), "weight");
    expect(mask, R * K, 1, "mask");
    const vnm::NonFinite nf = vnm::find_nonfinite_kept(t, weight.data(), mask.data(), R, K);
    return nb::make_tuple(nf.count, nf.row, nf.col);
  }, "weight"_a, "dtype"_a, "mask"_a, "R"_a, "K"_a);

  m.def("compress", [](const Any& weight, int dtype, const U8& mask, const vnm::Pattern& p,
                       int64_t R, int64_t K, Any values, U8 meta, U8 columns) {
    const vnm::DType t = to_dtype(dtype);
    const vnm::Layout L(p, R, K);
    expect(weight, R * K, size_t(vnm::dtype_size(t)), "weight");
    expect(mask, R * K, 1, "mask");
    expect_storage(L, t, values, meta, columns);
    nb::gil_scoped_release release;
    vnm::compress(L, t, weight.data(), mask.data(), values.data(), meta.data(), columns.data());
  }, "weight"_a, "dtype"_a, "mask"_a, "pattern"_a, "R"_a, "K"_a, "values"_a, "meta"_a,
        "columns"_a);

  m.def("check_storage", [](const vnm::Pattern& p, int64_t R, int64_t K, const U8& meta,
                            const U8& columns) {
    const vnm::Layout L(p, R, K);
    expect(meta, L.meta_bytes(), 1, "meta");
    expect(columns, L.columns_bytes(), 1, "columns");
    return vnm::check_storage(L, meta.data(), columns.data());
  }, "pattern"_a, "R"_a, "K"_a, "meta"_a, "columns"_a);

  m.def("decompress", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype,
                         const Any& values, const U8& meta, const U8& columns, Any dense,
                         U8 mask) {
    const vnm::DType t = to_dtype(dtype);
    const vnm::Layout L(p, R, K);
    expect_storage(L, t, values, meta, columns);
    void* dense_ptr = nullptr;
    if (dense.is_valid()) {
      expect(dense, R * K, size_t(vnm::dtype_size(t)), "dense");
      dense_ptr = dense.data();
    }
    uint8_t* mask_ptr = nullptr;
    if (mask.is_valid()) {
      expect(mask, R * K, 1, "mask");
      mask_ptr = mask.data();
    }
    nb::gil_scoped_release release;
    vnm::decompress(L, t, values.data(), meta.data(), columns.data(), dense_ptr, mask_ptr);
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values"_a, "meta"_a, "columns"_a,
        "dense"_a.none(), "mask"_a.none());

  m.def("spmm", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype, const Any& values,
                   const U8& meta, const U8& columns, const I32& perm, const I32& row_perm,
                   const Any& x, int64_t n_tokens, const Any& bias, Any y) {
    const vnm::DType t = to_dtype(dtype);
    const vnm::Layout L(p, R, K);
    expect_storage(L, t, values, meta, columns);
    expect(x, n_tokens * K, size_t(vnm::dtype_size(t)), "x");
    expect(y, n_tokens * R, size_t(vnm::dtype_size(t)), "y");
    const int32_t* perm_ptr = optional_perm(perm, K, "perm");
    const int32_t* row_ptr = optional_perm(row_perm, R, "row_perm");
    const void* bias_ptr = optional_any(bias, R, t, "bias");
    nb::gil_scoped_release release;
    vnm::spmm_reference(L, t, values.data(), meta.data(), columns.data(), perm_ptr, row_ptr,
                        x.data(), n_tokens, bias_ptr, y.data());
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values"_a, "meta"_a, "columns"_a, "perm"_a.none(),
        "row_perm"_a.none(), "x"_a, "n_tokens"_a, "bias"_a.none(), "y"_a);

  // ---- packed (mma.sp kernel) layout, CPU versions ------------------------------------------

  m.def("packed_layout", [](const vnm::Pattern& p, int64_t R, int64_t K) {
    const vnm::sp::PackedGeom g = geom_of(p, R, K);
    nb::dict d;
    d["MT"] = g.MT;
    d["KS"] = g.KS;
    d["Gp"] = g.Gp;
    d["KB"] = g.KB;
    d["values"] = nb::make_tuple(g.MT, g.KS, vnm::sp::kWarp, 8);
    d["meta"] = nb::make_tuple(g.MT, g.KS, 16);
    d["kidx"] = nb::make_tuple(g.KB, g.Gp, 4);
    return d;
  }, "pattern"_a, "R"_a, "K"_a, "Shapes of the packed arrays (see vnm/sp_layout.h).");

  m.def("pack", [](const vnm::Pattern& p, int64_t R, int64_t K, const Any& values, const U8& meta,
                   const U8& columns, const I32& perm, Any values_p, Any meta_p, Any kidx) {
    const vnm::Layout L(p, R, K);
    const vnm::sp::PackedGeom g = vnm::packed_geom(L);
    expect(values, L.values_count(), 2, "values");
    expect(meta, L.meta_bytes(), 1, "meta");
    expect(columns, L.columns_bytes(), 1, "columns");
    expect_packed(g, values_p, meta_p, kidx);
    const int32_t* perm_ptr = optional_perm(perm, K, "perm");
    nb::gil_scoped_release release;
    vnm::pack(g, static_cast<const uint16_t*>(values.data()), meta.data(), columns.data(), perm_ptr,
              static_cast<uint16_t*>(values_p.data()), static_cast<uint32_t*>(meta_p.data()),
              static_cast<int32_t*>(kidx.data()));
  }, "pattern"_a, "R"_a, "K"_a, "values"_a, "meta"_a, "columns"_a, "perm"_a.none(), "values_p"_a,
        "meta_p"_a, "kidx"_a, "Canonical storage -> packed arrays (16-bit values as raw bits).");

  m.def("unpack", [](const vnm::Pattern& p, int64_t R, int64_t K, const Any& values_p,
                     const Any& meta_p, const Any& kidx, const I32& inv_perm, Any values, U8 meta,
                     U8 columns) {
    const vnm::Layout L(p, R, K);
    const vnm::sp::PackedGeom g = vnm::packed_geom(L);
    expect_packed(g, values_p, meta_p, kidx);
    expect(values, L.values_count(), 2, "values");
    expect(meta, L.meta_bytes(), 1, "meta");
    expect(columns, L.columns_bytes(), 1, "columns");
    const int32_t* inv = optional_perm(inv_perm, K, "inv_perm");
    nb::gil_scoped_release release;
    vnm::unpack(g, static_cast<const uint16_t*>(values_p.data()),
                static_cast<const uint32_t*>(meta_p.data()),
                static_cast<const int32_t*>(kidx.data()), inv,
                static_cast<uint16_t*>(values.data()), meta.data(), columns.data());
  }, "pattern"_a, "R"_a, "K"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "inv_perm"_a.none(),
        "values"_a, "meta"_a, "columns"_a, "Packed arrays -> canonical storage.");

  m.def("spmm_packed", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype,
                          const Any& values_p, const Any& meta_p, const Any& kidx,
                          const I32& out_rows, const Any& x, int64_t n_tokens, const Any& bias,
                          Any y) {
    const vnm::DType t = to_dtype16(dtype);
    const vnm::sp::PackedGeom g = geom_of(p, R, K);
    expect_packed(g, values_p, meta_p, kidx);
    expect(x, n_tokens * K, 2, "x");
    expect(y, n_tokens * R, 2, "y");
    const int32_t* rows_ptr = optional_perm(out_rows, R, "out_rows");
    const void* bias_ptr = optional_any(bias, R, t, "bias");
    nb::gil_scoped_release release;
    vnm::spmm_packed_reference(g, t, static_cast<const uint16_t*>(values_p.data()),
                               static_cast<const uint32_t*>(meta_p.data()),
                               static_cast<const int32_t*>(kidx.data()), rows_ptr, x.data(),
                               n_tokens, bias_ptr, y.data());
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values_p"_a, "meta_p"_a, "kidx"_a,
        "out_rows"_a.none(), "x"_a, "n_tokens"_a, "bias"_a.none(), "y"_a,
        "Reference SpMM straight from the packed arrays.");

  m.def("packed_to_dense", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype,
                              const Any& values_p, const Any& meta_p, const Any& kidx, Any dense) {
    const vnm::DType t = to_dtype16(dtype);
    const vnm::sp::PackedGeom g = geom_of(p, R, K);
    expect_packed(g, values_p, meta_p, kidx);
    expect(dense, R * K, 2, "dense");
    nb::gil_scoped_release release;
    vnm::packed_to_dense(g, t, static_cast<const uint16_t*>(values_p.data()),
                         static_cast<const uint32_t*>(meta_p.data()),
                         static_cast<const int32_t*>(kidx.data()), dense.data());
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "dense"_a,
        "Dense R x K matrix in x's column order (perm folded in).");

  // Test hooks: the CPU model of mma.sp and the kernel emulations (vnm/mma_model.h).
  m.def("_mma_sp_model", [](int dtype, const Any& a, const Any& b, const Any& e, int selector,
                            Any acc) {
    const vnm::DType t = to_dtype16(dtype);
    expect(a, 128, 4, "a");
    expect(b, 128, 4, "b");
    expect(e, 32, 4, "e");
    expect(acc, 128, 4, "acc");
    return vnm::sp::mma_sp_m16n8k32(t, static_cast<const uint32_t(*)[4]>(a.data()),
                                    static_cast<const uint32_t(*)[4]>(b.data()),
                                    static_cast<const uint32_t*>(e.data()), selector,
                                    static_cast<float(*)[4]>(acc.data()));
  }, "dtype"_a, "a"_a, "b"_a, "e"_a, "selector"_a, "acc"_a,
        "One warp of mma.sp m16n8k32 on lane registers a[32][4], b[32][4], e[32]; acc[32][4] "
        "(fp32) in and out. Returns '' or the invalid metadata found.");

  m.def("_emulate_spmm", [](const vnm::Pattern& p, int64_t R, int64_t K, int dtype,
                            const Any& values_p, const Any& meta_p, const Any& kidx,
                            const I32& out_rows, const Any& x, int64_t n_tokens, const Any& bias,
                            Any y, int path, bool contiguous_b, int64_t decode_splits) {
    const vnm::DType t = to_dtype16(dtype);
    const vnm::sp::PackedGeom g = geom_of(p, R, K);
    expect_packed(g, values_p, meta_p, kidx);
    expect(x, n_tokens * K, 2, "x");
    expect(y, n_tokens * R, 2, "y");
    const int32_t* rows_ptr = optional_perm(out_rows, R, "out_rows");
    const void* bias_ptr = optional_any(bias, R, t, "bias");
    if (path < 0 || path > 2) throw std::invalid_argument("path must be 0, 1 or 2");
    nb::gil_scoped_release release;
    return vnm::sp::emulate_spmm(g, t, static_cast<const uint16_t*>(values_p.data()),
                                 static_cast<const uint32_t*>(meta_p.data()),
                                 static_cast<const int32_t*>(kidx.data()), rows_ptr, x.data(),
                                 n_tokens, K, bias_ptr, y.data(), R,
                                 static_cast<vnm::sp::Path>(path), contiguous_b, decode_splits);
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values_p"_a, "meta_p"_a, "kidx"_a, "out_rows"_a.none(), "x"_a,
        "n_tokens"_a, "bias"_a.none(), "y"_a, "path"_a, "contiguous_b"_a, "decode_splits"_a = 0,
        "Runs the CUDA kernel's logic on the CPU (path 0 auto, 1 decode, 2 tiled). Returns '' "
        "or the first problem the model of mma.sp found.");

  m.def("_fragment_maps", []() {
    // Every PTX-fact index function of sp_layout.h, tabulated for the tests to check against
    // the ISA's formulas: lists of (lane, i, ...) tuples.
    nb::list a, b, c, meta;
    for (int lane = 0; lane < vnm::sp::kWarp; ++lane) {
      for (int i = 0; i < 8; ++i) {
        const vnm::sp::AElem ea = vnm::sp::a_elem(lane, i);
        a.append(nb::make_tuple(lane, i, ea.row, ea.chunk, ea.slot));
        const vnm::sp::BElem eb = vnm::sp::b_elem(lane, i);
        b.append(nb::make_tuple(lane, i, eb.k, eb.n));
      }
      for (int i = 0; i < 4; ++i) {
        const vnm::sp::CElem ec = vnm::sp::c_elem(lane, i);
        c.append(nb::make_tuple(lane, i, ec.row, ec.n));
      }
    }
    for (int row = 0; row < 16; ++row)
      for (int chunk = 0; chunk < 8; ++chunk)
        meta.append(nb::make_tuple(row, chunk, vnm::sp::meta_lane(row, chunk, 0),
                                   vnm::sp::meta_shift(row, chunk)));
    nb::list words;
    for (int lane = 0; lane < vnm::sp::kWarp; ++lane)
      words.append(vnm::sp::meta_word_of_lane(lane));
    nb::dict d;
    d["a"] = a;
    d["b"] = b;
    d["c"] = c;
    d["meta"] = meta;
    d["meta_word_of_lane"] = words;
    return d;
  }, "The fragment maps of vnm/sp_layout.h (test hook).");

  m.def("_decode_plan", [](const vnm::Pattern& p, int64_t R, int64_t K, int64_t n_tokens,
                           int64_t decode_splits) {
    const vnm::sp::DecodePlan d = vnm::sp::decode_plan(geom_of(p, R, K), n_tokens, decode_splits);
    nb::dict out;
    out["nt"] = d.nt;
    out["wt"] = d.wt;
    out["kparts"] = d.kparts;
    out["row_ctas"] = d.row_ctas;
    out["splits"] = d.splits;
    out["token_ctas"] = d.token_ctas;
    out["ks_cta"] = d.ks_cta;
    out["ks_warp"] = d.ks_warp;
    out["smem_bytes"] = d.smem_bytes();
    out["workspace_floats"] = d.workspace_floats(n_tokens, R);
    return out;
  }, "pattern"_a, "R"_a, "K"_a, "n_tokens"_a, "decode_splits"_a = 0,
        "The decode kernel's work split (sp::decode_plan): a pure function of the shape.");

  m.def("_spmm_workspace_floats", [](const vnm::Pattern& p, int64_t R, int64_t K, int64_t n_tokens,
                                     int path, int64_t decode_splits) {
    if (path < 0 || path > 2) throw std::invalid_argument("path must be 0, 1 or 2");
    return vnm::sp::spmm_workspace_floats(geom_of(p, R, K), n_tokens,
                                          static_cast<vnm::sp::Path>(path), decode_splits);
  }, "pattern"_a, "R"_a, "K"_a, "n_tokens"_a, "path"_a = 0, "decode_splits"_a = 0,
        "float32 scratch elements the CUDA SpMM needs (decode split-K partials; 0: none).");

  m.def("_dispatch_plan", [](const vnm::Pattern& p, int64_t R, int64_t K, int64_t n_tokens,
                             bool has_perm) {
    // sp::kernel_plan is what vnm::cuda::plan calls; here for an x with ldx = K, 16-byte aligned.
    const vnm::sp::KernelPlan k = vnm::sp::kernel_plan(geom_of(p, R, K), n_tokens,
                                                       vnm::sp::Path::automatic, has_perm, K, true);
    return nb::make_tuple(int(k.path), k.bm, k.contiguous_b);
  }, "pattern"_a, "R"_a, "K"_a, "n_tokens"_a, "has_perm"_a,
        "(path, row tile, contiguous B) the GPU dispatch picks for an aligned x (test hook; runs "
        "on the CPU build).");

  // Test hook: converts n elements between dtypes with the core's conversions (load_as_float,
  // store_from_float), so tests can compare them with torch's rounding on every bit pattern.
  m.def("_cast", [](const Any& src, int src_dtype, Any dst, int dst_dtype) {
    const vnm::DType s = to_dtype(src_dtype), d = to_dtype(dst_dtype);
    const int64_t n = int64_t(src.size());
    expect(src, n, size_t(vnm::dtype_size(s)), "src");
    expect(dst, n, size_t(vnm::dtype_size(d)), "dst");
    for (int64_t i = 0; i < n; ++i)
      vnm::store_from_float(d, dst.data(), i, vnm::load_as_float(s, src.data(), i));
  }, "src"_a, "src_dtype"_a, "dst"_a, "dst_dtype"_a);

  // ---- permutation search (issue 5) ------------------------------------------------------------
  // The search runs with the GIL released; the progress callable (or None) is called between
  // rounds from this thread with the GIL re-acquired, and whatever it raises (KeyboardInterrupt
  // included) stops the search and propagates.
  m.def("search_permutation", [](const F32& scores, int64_t R, int64_t K, const vnm::Pattern& p,
                                 double time_budget, uint64_t seed, int64_t max_rounds,
                                 int64_t patience, bool permute_rows, bool permute_cols,
                                 int64_t col_segment, int64_t row_segment, nb::object progress,
                                 I64 row_perm, I64 col_perm) {
    expect(scores, R * K, 4, "scores");
    expect(row_perm, R, 8, "row_perm");
    expect(col_perm, K, 8, "col_perm");
    vnm::PermuteOptions opt;
    opt.time_budget_s = time_budget;
    opt.seed = seed;
    opt.max_rounds = max_rounds;
    opt.patience = patience;
    opt.permute_rows = permute_rows;
    opt.permute_cols = permute_cols;
    opt.col_segment = col_segment;
    opt.row_segment = row_segment;
    vnm::PermuteCallback callback;
    if (!progress.is_none()) {
      callback = [&progress](const vnm::PermuteProgress& pr) {
        nb::gil_scoped_acquire acquire;
        nb::object keep_going = progress(pr.elapsed_s, pr.rounds, pr.escapes, pr.kept_identity,
                                         pr.kept_best);
        return keep_going.is_none() || nb::cast<bool>(keep_going);
      };
    }
    vnm::PermuteResult res;
    {
      nb::gil_scoped_release release;
      res = vnm::search_permutation(scores.data(), R, K, p, opt, callback);
    }
    std::copy(res.row_perm.begin(), res.row_perm.end(), row_perm.data());
    std::copy(res.col_perm.begin(), res.col_perm.end(), col_perm.data());
    nb::dict d;
    d["kept_identity"] = res.kept_identity;
    d["kept"] = res.kept;
    d["kept_random"] = res.kept_random;
    d["kept_unstructured_rows"] = res.kept_unstructured_rows;
    d["kept_unstructured"] = res.kept_unstructured;
    d["rounds"] = res.rounds;
    d["escapes"] = res.escapes;
    d["seconds"] = res.seconds;
    d["converged"] = res.converged;
    return d;
  }, "scores"_a, "R"_a, "K"_a, "pattern"_a, "time_budget"_a, "seed"_a, "max_rounds"_a,
        "patience"_a, "permute_rows"_a, "permute_cols"_a, "col_segment"_a, "row_segment"_a,
        "progress"_a.none(), "row_perm"_a, "col_perm"_a);

  m.def("kept_score", [](const F32& scores, int64_t R, int64_t K, const vnm::Pattern& p) {
    expect(scores, R * K, 4, "scores");
    return vnm::kept_score(scores.data(), R, K, p);
  }, "scores"_a, "R"_a, "K"_a, "pattern"_a, nb::call_guard<nb::gil_scoped_release>(),
        "Sum, in double, of the scores select_mask keeps.");
  // ---- end permutation search ------------------------------------------------------------------

  m.def("num_threads", &vnm::num_threads, "Threads the C++ core uses.");
  m.def("set_num_threads", &vnm::set_num_threads, "n"_a,
        "Set the threads the C++ core uses (n <= 0: VNM_NUM_THREADS or all cores).");

#ifdef VNM_WITH_CUDA
  m.attr("cuda_built") = true;
  bind_cuda(m);
#else
  m.attr("cuda_built") = false;
#endif
  // What the build was asked for and found (set by CMakeLists.txt), so a test can tell a build
  // that was meant to be CPU-only from one that silently missed nvcc.
  nb::dict build;
#if defined(VNM_CUDA_REQUESTED) && VNM_CUDA_REQUESTED
  build["cuda_requested"] = true;
#else
  build["cuda_requested"] = false;
#endif
#ifdef VNM_CUDA_COMPILER
  build["cuda_compiler"] = VNM_CUDA_COMPILER;
#else
  build["cuda_compiler"] = "";
#endif
  // What the kernels were built for (CMake's list, see CMakeLists.txt): empty lists on a CPU build.
  auto split = [](const char* text) {
    nb::list out;
    std::string item;
    for (const char* c = text;; ++c) {
      if (*c == ',' || *c == '\0') {
        if (!item.empty()) out.append(nb::str(item.c_str()));
        item.clear();
        if (*c == '\0') break;
      } else {
        item += *c;
      }
    }
    return out;
  };
#ifdef VNM_WITH_CUDA
  build["cuda_archs"] = split(VNM_CUDA_ARCHS);    // as given to CMake, e.g. 80-real, 90
  build["cuda_sass"] = split(VNM_CUDA_SASS);      // machine code carried: sm_80, ...
  build["cuda_ptx"] = split(VNM_CUDA_PTX);        // PTX carried (JIT-compiled on newer GPUs)
  build["cuda_sources"] = split(VNM_CUDA_SOURCES);
  build["cuda_version"] = VNM_CUDA_VERSION;
  build["cudart"] = "static";
#else
  build["cuda_archs"] = split("");
  build["cuda_sass"] = split("");
  build["cuda_ptx"] = split("");
  build["cuda_sources"] = split("");
  build["cuda_version"] = "";
  build["cudart"] = "";
#endif
  m.attr("build_info") = build;
}
