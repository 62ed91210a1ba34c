// The hand-written kernels (kernels.cpp, built per instruction set) as PyTorch operators, torch.ops.gpt2.*.
// gpt2/inference/ops.py builds this file once per machine against PyTorch's headers, loads it with
// torch.ops.load_library and hands it the kernels' addresses (gpt2_bind); then every operator checks its
// arguments (device, dtype, shape, contiguity: one clear error, never a read past what a tensor holds),
// makes its output and calls the kernel on PyTorch's threads. In C++, a call from Python costs what an
// ATen operator's does; the fake implementations that torch.compile traces with live in ops.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace {

// The kernels' entry points, as kernels.cpp declares them.
using FloatProduct = void (*)(const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, int, int);
using Int8Product = void (*)(const float*, const int8_t*, const float*, const int32_t*, const float*, float*, int64_t,
                             int64_t, int64_t, int, int);
using Int4Product = void (*)(const float*, const uint8_t*, const float*, float*, int64_t, int64_t, int64_t, int, int);
using Attend = void (*)(const void*, void*, void*, const bool*, void*, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                        int, int);

struct Kernels {
  FloatProduct f32 = nullptr, bf16 = nullptr;
  Int8Product i8 = nullptr;
  Int4Product i4 = nullptr;
  Attend attend = nullptr;
  std::string off = "the kernels were not loaded";  // why a missing one is missing
} kernels;

// A dtype as Python writes it (torch.float32), for the errors.
std::string name_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "torch.float32";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kDouble: return "torch.float64";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return c10::toString(dtype);
  }
}

// The checks every operator makes of a tensor argument: on the CPU, contiguous, of `dtype`, `dims`
// dimensions; sizes are checked by the callers, naming what each must match.
void check_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "torch.ops.gpt2.", op, ": ", name, " is on ", t.device(),
                    "; the kernels run on the CPU");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "torch.ops.gpt2.", op, ": ", name, " is ", name_of(t.scalar_type()),
                    "; it must be ", name_of(dtype));
  TORCH_CHECK_VALUE(dims < 0 ? t.dim() >= 1 : t.dim() == dims, "torch.ops.gpt2.", op, ": ", name, " has shape ",
                    t.sizes(), "; it must have ", dims < 0 ? "at least one" : std::to_string(dims), " dimension(s)");
  TORCH_CHECK_VALUE(t.is_contiguous(), "torch.ops.gpt2.", op, ": ", name, " is not contiguous; pass .contiguous()");
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t size, const char* why) {
  TORCH_CHECK_VALUE(t.size(dim) == size, "torch.ops.gpt2.", op, ": ", name, " has shape ", t.sizes(), "; its size ",
                    dim, " must be ", size, " (", why, ")");
}

// A tensor's checks (check_tensor) and each of its sizes, with what the size must match (-1: any).
struct Size {
  int64_t size;
  const char* why;
};
void check_sizes(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                 std::initializer_list<Size> sizes) {
  check_tensor(op, name, t, dtype, (int64_t)sizes.size());
  int64_t dim = 0;
  for (const Size& s : sizes) {
    if (s.size >= 0) check_size(op, name, t, dim, s.size, s.why);
    ++dim;
  }
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, at::ScalarType dtype, int64_t out_features) {
  if (!bias) return;
  check_sizes(op, "bias", *bias, dtype, {{out_features, "out_features"}});
}

void check_kernel(const char* op, const void* kernel, const char* precision) {
  TORCH_CHECK(kernel != nullptr, "torch.ops.gpt2.", op, ": the ", precision, " kernel does not run here (",
              kernels.off, ")");
}

// x (..., in): its rows and inputs, the inputs a positive multiple of `multiple`.
std::pair<int64_t, int64_t> check_x(const char* op, const at::Tensor& x, at::ScalarType dtype, int64_t multiple) {
  check_tensor(op, "x", x, dtype, -1);
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(in > 0 && in % multiple == 0, "torch.ops.gpt2.", op, ": x has ", in,
                    " inputs; the kernel takes a positive multiple of ", multiple);
  return {in ? x.numel() / in : 0, in};
}

at::Tensor output(const at::Tensor& x, int64_t out_features, at::ScalarType dtype) {
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_features;
  return at::empty(sizes, x.options().dtype(dtype));
}

int64_t blocks(int64_t rows) { return (rows + 63) / 64; }

// x (..., in) float32 or bfloat16 times a weight in oneDNN's blocked layout (N / 64, in / pair, 64, pair),
// held as parts of consecutive rows, each filled but the last (the tied LM head: its whole blocks in the
// embedding's memory, its last rows in a padded block of their own); + bias, then tanh-GELU when `gelu`
// (a weight in one part).
at::Tensor blocked_linear(const at::Tensor& x, at::TensorList weight, const std::optional<at::Tensor>& bias,
                          int64_t out_features, bool gelu) {
  const char* op = "blocked_linear";
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, "torch.ops.gpt2.", op, ": x is ", name_of(dtype),
                    "; it must be torch.float32 or torch.bfloat16");
  const int64_t pair = dtype == at::kBFloat16 ? 2 : 1;
  const auto [M, K] = check_x(op, x, dtype, pair);
  TORCH_CHECK_VALUE(!weight.empty(), "torch.ops.gpt2.", op, ": weight must be a list of one or more blocked parts");
  TORCH_CHECK_VALUE(weight.size() == 1 || (!bias && !gelu), "torch.ops.gpt2.", op,
                    ": a weight in several parts takes no bias and no GELU");
  const FloatProduct run = dtype == at::kFloat ? kernels.f32 : kernels.bf16;
  check_kernel(op, (const void*)run, dtype == at::kFloat ? "fp32" : "bf16");
  int64_t first = 0;
  for (size_t i = 0; i < weight.size(); ++i) {
    const at::Tensor& part = weight[i];
    check_sizes(op, "a weight part", part, dtype,
                {{-1, ""}, {K / pair, "x's inputs / pair"}, {64, "rows per block"}, {pair, "inputs side by side"}});
    const int64_t room = 64 * part.size(0);
    TORCH_CHECK_VALUE(first + room <= blocks(out_features) * 64 && (i + 1 == weight.size() || first + room <= out_features),
                      "torch.ops.gpt2.", op, ": the weight's parts hold more rows than out_features=", out_features,
                      " in blocks of 64, every part filled but the last");
    first += room;
  }
  TORCH_CHECK_VALUE(first >= out_features, "torch.ops.gpt2.", op, ": the weight's parts hold ", first,
                    " rows; out_features=", out_features, " needs ", blocks(out_features) * 64);
  check_bias(op, bias, dtype, out_features);
  at::Tensor y = output(x, out_features, dtype);
  const void* b = bias ? bias->data_ptr() : nullptr;
  const int threads = at::get_num_threads();
  first = 0;
  for (const at::Tensor& part : weight) {
    const int64_t rows = std::min<int64_t>(64 * part.size(0), out_features - first);
    char* out = (char*)y.data_ptr() + first * y.element_size();
    run(x.data_ptr(), part.data_ptr(), b, out, M, K, rows, out_features, gelu, threads);
    first += rows;
  }
  return y;
}

// x (..., in) float32, each row quantised to 8 bits, times an int8 weight (N / 64, in / 4, 64, 4) with a
// float32 scale and the int32 sum of each row.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& sums,
                       const std::optional<at::Tensor>& bias, int64_t out_features, bool gelu) {
  const char* op = "int8_linear";
  const auto [M, K] = check_x(op, x, at::kFloat, 16);
  check_sizes(op, "weight", weight, at::kChar, {{blocks(out_features), "blocks of 64 rows"},
              {K / 4, "x's inputs / 4"}, {64, "rows per block"}, {4, "inputs side by side"}});
  check_sizes(op, "scales", scales, at::kFloat, {{out_features, "out_features"}});
  check_sizes(op, "sums", sums, at::kInt, {{out_features, "out_features"}});
  check_bias(op, bias, at::kFloat, out_features);
  check_kernel(op, (const void*)kernels.i8, "int8");
  at::Tensor y = output(x, out_features, at::kFloat);
  kernels.i8(x.data_ptr<float>(), weight.data_ptr<int8_t>(), scales.data_ptr<float>(), sums.data_ptr<int32_t>(),
             bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), M, K, out_features, gelu,
             at::get_num_threads());
  return y;
}

// x (..., in) float32, each row quantised to 8 bits, times an int4 weight (N / 64, in / 32, 1280) uint8.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t out_features, bool gelu) {
  const char* op = "int4_linear";
  const auto [M, K] = check_x(op, x, at::kFloat, 32);
  check_sizes(op, "weight", weight, at::kByte, {{blocks(out_features), "blocks of 64 rows"},
              {K / 32, "x's inputs / 32"}, {1280, "bytes per group of 32 inputs"}});
  check_bias(op, bias, at::kFloat, out_features);
  check_kernel(op, (const void*)kernels.i4, "int4");
  at::Tensor y = output(x, out_features, at::kFloat);
  kernels.i4(x.data_ptr<float>(), weight.data_ptr<uint8_t>(), bias ? bias->data_ptr<float>() : nullptr,
             y.data_ptr<float>(), M, K, out_features, gelu, at::get_num_threads());
  return y;
}

// One layer's attention over the KV cache: the chunk's keys and values in qkv (B, T, 3 H 64) written into
// keys and values (rows >= B, H, max_len, 64) from position `length`, each query attending over the
// positions up to its own that `real` (rows, max_len) marks; the output (B, T, H 64) in qkv's dtype.
at::Tensor attend(const at::Tensor& qkv, at::Tensor& keys, at::Tensor& values, const at::Tensor& real,
                  const at::Tensor& length) {
  const char* op = "attend";
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, "torch.ops.gpt2.", op, ": qkv is ", name_of(dtype),
                    "; it must be torch.float32 or torch.bfloat16");
  check_tensor(op, "qkv", qkv, dtype, 3);
  const auto cache = keys.scalar_type();
  TORCH_CHECK_VALUE(cache == at::kBFloat16 || (cache == at::kFloat && dtype == at::kFloat), "torch.ops.gpt2.", op,
                    ": a cache of ", name_of(cache), " under ", name_of(dtype), " activations; the kernel reads float32 or bfloat16 "
                    "caches under float32 activations, bfloat16 ones under bfloat16");
  check_tensor(op, "keys", keys, cache, 4);
  check_tensor(op, "values", values, cache, 4);
  TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), "torch.ops.gpt2.", op, ": values have shape ", values.sizes(),
                    " and keys ", keys.sizes(), "; they must be the same");
  check_size(op, "keys", keys, 3, 64, "head_dim: the kernel takes heads of 64");
  const int64_t B = qkv.size(0), T = qkv.size(1), H = keys.size(1), max_len = keys.size(2);
  check_size(op, "qkv", qkv, 2, 3 * H * 64, "3 x the cache's heads x 64");
  TORCH_CHECK_VALUE(B <= keys.size(0), "torch.ops.gpt2.", op, ": qkv has ", B, " rows; the cache holds ",
                    keys.size(0));
  check_sizes(op, "real", real, at::kBool, {{keys.size(0), "the cache's rows"}, {max_len, "the cache's positions"}});
  check_sizes(op, "length", length, at::kLong, {{1, "one count"}});
  const int64_t written = length.item<int64_t>();
  TORCH_CHECK_VALUE(written >= 0 && written + T <= max_len, "torch.ops.gpt2.", op, ": ", T, " new positions after ",
                    written, " do not fit the cache's ", max_len);
  check_kernel(op, (const void*)kernels.attend, "attention");
  at::Tensor out = at::empty({B, T, H * 64}, qkv.options());
  kernels.attend(qkv.data_ptr(), keys.data_ptr(), values.data_ptr(), real.data_ptr<bool>(), out.data_ptr(), B, T, H,
                 max_len, written, (int)qkv.element_size(), (int)keys.element_size(), at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY(gpt2, m) {
  m.def("blocked_linear(Tensor x, Tensor[] weight, Tensor? bias, int out_features, bool gelu) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor sums, Tensor? bias, int out_features, bool gelu) "
        "-> Tensor");
  m.def("int4_linear(Tensor x, Tensor weight, Tensor? bias, int out_features, bool gelu) -> Tensor");
  m.def("attend(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, Tensor real, Tensor length) -> Tensor");
}

TORCH_LIBRARY_IMPL(gpt2, CPU, m) {
  m.impl("blocked_linear", blocked_linear);
  m.impl("int8_linear", int8_linear);
  m.impl("int4_linear", int4_linear);
  m.impl("attend", attend);
}

// Hand the operators the kernels of the library kernels.py loaded (a null one: not in this build), and
// why any is missing.
extern "C" void gpt2_bind(void* f32, void* bf16, void* i8, void* i4, void* attend, const char* off) {
  kernels.f32 = (FloatProduct)f32;
  kernels.bf16 = (FloatProduct)bf16;
  kernels.i8 = (Int8Product)i8;
  kernels.i4 = (Int4Product)i4;
  kernels.attend = (Attend)attend;
  kernels.off = off ? off : "";
}
