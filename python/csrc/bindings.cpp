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

#include "vnm/core.h"
#include "vnm/format.h"
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

const void* optional_any(const Any& a, int64_t count, vnm::DType t, const char* what) {
  if (!a.is_valid()) return nullptr;
  expect(a, count, size_t(vnm::dtype_size(t)), what);
  return a.data();
}

}  // namespace

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
                   const U8& meta, const U8& columns, const I32& perm, const Any& x,
                   int64_t n_tokens, const Any& bias, Any y) {
    const vnm::DType t = to_dtype(dtype);
    const vnm::Layout L(p, R, K);
    expect_storage(L, t, values, meta, columns);
    expect(x, n_tokens * K, size_t(vnm::dtype_size(t)), "x");
    expect(y, n_tokens * R, size_t(vnm::dtype_size(t)), "y");
    const int32_t* perm_ptr = optional_i32(perm, K, "perm");
    const void* bias_ptr = optional_any(bias, R, t, "bias");
    nb::gil_scoped_release release;
    vnm::spmm_reference(L, t, values.data(), meta.data(), columns.data(), perm_ptr, x.data(),
                        n_tokens, bias_ptr, y.data());
  }, "pattern"_a, "R"_a, "K"_a, "dtype"_a, "values"_a, "meta"_a, "columns"_a, "perm"_a.none(),
        "x"_a, "n_tokens"_a, "bias"_a.none(), "y"_a);

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
#else
  m.attr("cuda_built") = false;
#endif
}
