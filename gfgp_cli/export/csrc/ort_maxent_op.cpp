// onnxruntime custom-op library for the gfgp domain: gfgp::MaxEntPool2d and gfgp::MaxEntPool3d
// (domain version 1, gfgp_cli/export/maxent_function.py) computed by the fused CPU kernel of
// gfgp_cli/ops/csrc/maxent_pool_cpu.cpp, which is compiled into the same library.
//
//   g++ -O3 -std=c++17 -shared -fPIC -fvisibility=hidden -ffp-contract=off -fno-math-errno -march=native
//       gfgp_cli/export/csrc/ort_maxent_op.cpp gfgp_cli/ops/csrc/maxent_pool_cpu.cpp -o libgfgp_ort.so
//
// (gfgp_cli/export/ort_kernel.py builds it so, cached.) onnxruntime loads it with
// SessionOptions.register_custom_ops_library (Python) / Ort::SessionOptions::RegisterCustomOpsLibrary
// (C++) and calls RegisterCustomOps, the one exported symbol. A session with the library runs
// each gfgp node as one kernel; without it onnxruntime runs the node's model-local function body.
//
// The onnxruntime C ABI is used through the minimal declarations below (the wheel ships no C
// headers). They follow the layout of onnxruntime's public onnxruntime_c_api.h: OrtApi is a
// table of function pointers that only ever grows at its end, so an index stays valid in every
// later release; the library asks GetApi for version 17 (onnxruntime 1.17, the release that added
// KernelContext_ParallelFor) and names only the slots it calls, every other slot is padding.
// OrtCustomOp is declared up to GetEndVersion, the last member read for a version-17 op.
//
// Threads: the kernel's tasks ((n, c) planes; onnxruntime tensors are NCHW/NCDHW) run on
// onnxruntime's intra-op thread pool through KernelContext_ParallelFor, not on OpenMP (the
// library is built without it): a second pool would compete with onnxruntime's threads.
//
// Errors: bad attributes fail the session's creation (CreateKernelV2), bad inputs the run
// (KernelComputeV2), each with an OrtStatus naming the node's op and the problem; no C++
// exception leaves the library.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#define GFGP_EXPORT extern "C" __attribute__((visibility("default")))

// ------------------------------------------------------------------ the fused kernel (maxent_pool_cpu.cpp)
extern "C" {
int64_t gfgp_maxent_num_tasks(const int64_t* geo, int nhwc);
int64_t gfgp_maxent_parallel_min_outputs();
void gfgp_maxent_forward_tasks_f32(const float* x, const float* lam, float* y, const int64_t* geo, const int64_t* ls,
                                   int nhwc, int64_t t0, int64_t t1);
void gfgp_maxent_forward_tasks_f64(const double* x, const double* lam, double* y, const int64_t* geo,
                                   const int64_t* ls, int nhwc, int64_t t0, int64_t t1);
}

// ------------------------------------------------------------------ onnxruntime C ABI (minimal)
extern "C" {
struct OrtStatus;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtShapeInferContext;

enum OrtErrorCode : int { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2, ORT_RUNTIME_EXCEPTION = 6 };
enum ONNXTensorElementDataType : int {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE = 11,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
};
enum OrtMemType : int { OrtMemTypeDefault = 0 };
enum OrtCustomOpInputOutputCharacteristic : int { INPUT_OUTPUT_REQUIRED = 0 };

// The OrtApi table: slot i is the i-th function pointer of onnxruntime_c_api.h's struct OrtApi.
struct OrtApi {
  OrtStatus* (*CreateStatus)(OrtErrorCode code, const char* msg);  // 0
  void* pad_1;                                                       // 1 (GetErrorCode)
  const char* (*GetErrorMessage)(const OrtStatus* status);           // 2
  void* pad_3_25[23];                                                // 3-25
  OrtStatus* (*CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);  // 26
  OrtStatus* (*CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op);  // 27
  OrtStatus* (*AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);  // 28
  void* pad_29_50[22];                                                                      // 29-50
  OrtStatus* (*GetTensorMutableData)(OrtValue* value, void** out);                          // 51
  void* pad_52_59[8];                                                                       // 52-59
  OrtStatus* (*GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info, ONNXTensorElementDataType* out);  // 60
  OrtStatus* (*GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);                      // 61
  OrtStatus* (*GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n);              // 62
  void* pad_63_64[2];                                                                                         // 63-64
  OrtStatus* (*GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);               // 65
  void* pad_66_85[20];                                                                                        // 66-85
  OrtStatus* (*KernelInfoGetAttribute_int64)(const OrtKernelInfo* info, const char* name, int64_t* out);     // 86
  void* pad_87;                                                                                               // 87
  OrtStatus* (*KernelContext_GetInputCount)(const OrtKernelContext* context, size_t* out);                   // 88
  OrtStatus* (*KernelContext_GetOutputCount)(const OrtKernelContext* context, size_t* out);                  // 89
  OrtStatus* (*KernelContext_GetInput)(const OrtKernelContext* context, size_t index, const OrtValue** out);  // 90
  OrtStatus* (*KernelContext_GetOutput)(OrtKernelContext* context, size_t index, const int64_t* dims, size_t n,
                                        OrtValue** out);  // 91
  void* pad_92;                                           // 92 (ReleaseEnv)
  void (*ReleaseStatus)(OrtStatus* status);               // 93
  void* pad_94_98[5];                                     // 94-98
  void (*ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);  // 99
  void* pad_100_162[63];                                                   // 100-162
  OrtStatus* (*KernelInfoGetAttributeArray_int64)(const OrtKernelInfo* info, const char* name, int64_t* out,
                                                  size_t* size);  // 163
  void* pad_164_273[110];                                         // 164-273
  OrtStatus* (*KernelContext_ParallelFor)(const OrtKernelContext* context, void (*fn)(void*, size_t), size_t total,
                                          size_t num_batch, void* usr_data);  // 274 (API 17)
};

#define GFGP_SLOT(member, index) \
  static_assert(offsetof(OrtApi, member) == (index) * sizeof(void*), #member " is not OrtApi slot " #index)
GFGP_SLOT(CreateStatus, 0);
GFGP_SLOT(GetErrorMessage, 2);
GFGP_SLOT(CreateCustomOpDomain, 26);
GFGP_SLOT(CustomOpDomain_Add, 27);
GFGP_SLOT(AddCustomOpDomain, 28);
GFGP_SLOT(GetTensorMutableData, 51);
GFGP_SLOT(GetTensorElementType, 60);
GFGP_SLOT(GetDimensionsCount, 61);
GFGP_SLOT(GetDimensions, 62);
GFGP_SLOT(GetTensorTypeAndShape, 65);
GFGP_SLOT(KernelInfoGetAttribute_int64, 86);
GFGP_SLOT(KernelContext_GetInputCount, 88);
GFGP_SLOT(KernelContext_GetOutputCount, 89);
GFGP_SLOT(KernelContext_GetInput, 90);
GFGP_SLOT(KernelContext_GetOutput, 91);
GFGP_SLOT(ReleaseStatus, 93);
GFGP_SLOT(ReleaseTensorTypeAndShapeInfo, 99);
GFGP_SLOT(KernelInfoGetAttributeArray_int64, 163);
GFGP_SLOT(KernelContext_ParallelFor, 274);
#undef GFGP_SLOT

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

// OrtCustomOp as onnxruntime reads it for version 17 (the members after GetEndVersion are read
// only from later versions).
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info, void** kernel);
  OrtStatus* (*KernelComputeV2)(void* kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int (*GetStartVersion)(const OrtCustomOp* op);
  int (*GetEndVersion)(const OrtCustomOp* op);
};
}  // extern "C"

namespace {

constexpr uint32_t kApiVersion = 17;
constexpr const char* kDomain = "gfgp";

const OrtApi* g_api = nullptr;  // set by RegisterCustomOps before any op is created

// ------------------------------------------------------------------ errors
struct Error {
  std::string message;
};

OrtStatus* to_status(const std::string& op_name, const std::string& message, OrtErrorCode code) noexcept {
  try {
    return g_api->CreateStatus(code, ("gfgp::" + op_name + ": " + message).c_str());
  } catch (...) {  // no memory even for the message: a literal one
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, "gfgp: out of memory");
  }
}

// Throws Error when an onnxruntime call failed (its own message kept); the status is released.
void check(OrtStatus* status, const char* what) {
  if (status == nullptr) return;
  std::string message;
  try {
    message = std::string(what) + " failed: " + g_api->GetErrorMessage(status);
  } catch (...) {
    g_api->ReleaseStatus(status);
    throw;
  }
  g_api->ReleaseStatus(status);
  throw Error{message};
}

std::string ints(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// ------------------------------------------------------------------ attributes
// Optional int64 list attribute: false when the node does not have it.
bool attribute_ints(const OrtKernelInfo* info, const char* name, std::vector<int64_t>& out) {
  size_t size = 0;
  OrtStatus* status = g_api->KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (status != nullptr) {  // absent (or not an int list: the type check is onnxruntime's)
    g_api->ReleaseStatus(status);
    return false;
  }
  out.assign(size, 0);
  if (size) check(g_api->KernelInfoGetAttributeArray_int64(info, name, out.data(), &size), name);
  return true;
}

// Optional int64 attribute: false when the node does not have it; Error when it has another type
// (onnxruntime does not type-check a custom domain's attributes: a float ceil_mode would otherwise
// silently read as absent). onnxruntime says "No attribute ..." for an absent one.
bool attribute_int(const OrtKernelInfo* info, const char* name, int64_t& out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, &out);
  if (status == nullptr) return true;
  std::string message;
  try {
    message = g_api->GetErrorMessage(status);
  } catch (...) {
    g_api->ReleaseStatus(status);
    throw;
  }
  g_api->ReleaseStatus(status);
  if (message.find("No attribute") != std::string::npos) return false;
  throw Error{std::string("the ") + name + " attribute must be an int: " + message};
}

// The node's geometry, checked: D = 2 (MaxEntPool2d) or 3 (MaxEntPool3d) spatial dims.
struct Kernel {
  std::string op_name;
  int dims = 2;
  std::vector<int64_t> kernel, strides, pads;  // pads: begin..., end... (ONNX order)
  bool ceil_mode = false;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};

// Bounds of the geometry: each attribute value, and the positions of one window (the kernel keeps
// (2 K + 4) values per output column of a block of rows per thread).
constexpr int64_t kMaxAttribute = int64_t(1) << 20;
constexpr int64_t kMaxWindow = int64_t(1) << 20;
constexpr int64_t kMaxBufferValues = int64_t(1) << 28;

void read_attributes(const OrtKernelInfo* info, Kernel& k) {
  const size_t D = static_cast<size_t>(k.dims);
  if (!attribute_ints(info, "kernel_shape", k.kernel))
    throw Error{"the kernel_shape attribute (" + std::to_string(D) + " ints) is missing"};
  if (k.kernel.size() != D)
    throw Error{"kernel_shape must have " + std::to_string(D) + " ints, got " + ints(k.kernel)};
  if (!attribute_ints(info, "strides", k.strides)) k.strides.assign(D, 1);
  if (k.strides.size() != D) throw Error{"strides must have " + std::to_string(D) + " ints, got " + ints(k.strides)};
  if (!attribute_ints(info, "pads", k.pads)) k.pads.assign(2 * D, 0);
  if (k.pads.size() != 2 * D)
    throw Error{"pads must have " + std::to_string(2 * D) + " ints (every dim's begin, then every dim's end), got " +
                ints(k.pads)};
  int64_t ceil = 0;
  if (attribute_int(info, "ceil_mode", ceil) && ceil != 0 && ceil != 1)
    throw Error{"ceil_mode must be 0 or 1, got " + std::to_string(ceil)};
  k.ceil_mode = ceil == 1;
  int64_t window = 1;  // positions per window, bounded so that sizes below never overflow
  for (size_t d = 0; d < D; ++d) {
    if (k.kernel[d] < 1 || k.kernel[d] > kMaxAttribute)
      throw Error{"kernel_shape must be between 1 and " + std::to_string(kMaxAttribute) + ", got " + ints(k.kernel)};
    if (k.strides[d] < 1 || k.strides[d] > kMaxAttribute)
      throw Error{"strides must be between 1 and " + std::to_string(kMaxAttribute) + ", got " + ints(k.strides)};
    if (k.pads[d] < 0 || k.pads[D + d] < 0 || k.pads[d] > kMaxAttribute || k.pads[D + d] > kMaxAttribute)
      throw Error{"pads must be between 0 and " + std::to_string(kMaxAttribute) + ", got " + ints(k.pads)};
    window *= k.kernel[d];
    if (window > kMaxWindow)
      throw Error{"kernel_shape " + ints(k.kernel) + " has more than " + std::to_string(kMaxWindow) +
                  " positions per window"};
    // A window that starts this far in the begin padding would hold no input position.
    if (k.pads[d] >= k.kernel[d])
      throw Error{"pads " + ints(k.pads) + " must be below kernel_shape " + ints(k.kernel) +
                  " (a window made only of padding has no value)"};
  }
}

// The output length of one dim, as the function body computes it (PyTorch's ceil_mode rule: a
// last window that would start in the end padding is dropped); -1 if there is no window.
int64_t output_length(int64_t n, int64_t k, int64_t s, int64_t pb, int64_t pe, bool ceil_mode) {
  const int64_t end = n + pb + pe - k + 1 + (ceil_mode ? s - 1 : 0);
  const int64_t lim = end < n + pb ? end : n + pb;
  return lim <= 0 ? -1 : (lim + s - 1) / s;
}

// ------------------------------------------------------------------ compute
struct Shape {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
};

Shape shape_of(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api->GetTensorTypeAndShape(value, &info), "GetTensorTypeAndShape");
  Shape s;
  size_t rank = 0;
  OrtStatus* st = g_api->GetTensorElementType(info, &s.type);
  if (st == nullptr) st = g_api->GetDimensionsCount(info, &rank);
  if (st == nullptr) {
    s.dims.assign(rank, 0);
    st = g_api->GetDimensions(info, s.dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  check(st, "reading a tensor's shape");
  return s;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    default: return "a type other than float16/bfloat16/float32/float64";
  }
}

// ------------------------------------------------------------------ float16 / bfloat16
// Computed in float32, as the eager op computes them: the inputs are widened (exactly), the
// output rounded to nearest even (as PyTorch's .to(torch.float16 / torch.bfloat16)).
inline float bits_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t float_to_half(float f) {
  const uint32_t b = float_bits(f), sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half, mant = round(|f| 2^24) (the FPU rounds to even)
    const float scaled = bits_float(a) * 16777216.0f;  // exact: a power of two
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;  // round to an integer, ties to even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rounded));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

uint16_t float_to_bf16(float f) {
  const uint32_t b = float_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // NaN stays NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

std::vector<float> widen(const void* p, int64_t n, bool bf16) {
  const uint16_t* h = static_cast<const uint16_t*>(p);
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[i] = bf16 ? bf16_to_float(h[i]) : half_to_float(h[i]);
  return out;
}

void narrow(const std::vector<float>& v, void* p, bool bf16) {
  uint16_t* h = static_cast<uint16_t*>(p);
  for (size_t i = 0; i < v.size(); ++i) h[i] = bf16 ? float_to_bf16(v[i]) : float_to_half(v[i]);
}

int64_t count(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t v : dims) n *= v;
  return n;
}

struct Job {
  const void* x;
  const void* lam;
  void* y;
  const int64_t* geo;
  const int64_t* ls;
  int64_t tasks, chunks;
  bool f64;
  std::atomic<bool> failed{false};
};

void run_chunk(void* data, size_t i) {
  Job& job = *static_cast<Job*>(data);
  const int64_t ci = static_cast<int64_t>(i);
  const int64_t t0 = job.tasks * ci / job.chunks, t1 = job.tasks * (ci + 1) / job.chunks;
  try {
    if (job.f64)
      gfgp_maxent_forward_tasks_f64(static_cast<const double*>(job.x), static_cast<const double*>(job.lam),
                                    static_cast<double*>(job.y), job.geo, job.ls, 0, t0, t1);
    else
      gfgp_maxent_forward_tasks_f32(static_cast<const float*>(job.x), static_cast<const float*>(job.lam),
                                    static_cast<float*>(job.y), job.geo, job.ls, 0, t0, t1);
  } catch (...) {  // std::bad_alloc from the kernel's buffers: never through onnxruntime's pool
    job.failed = true;
  }
}

// Chunks handed to the pool: a few per thread for any likely pool size, dealt out dynamically.
constexpr int64_t kMaxChunks = 128;

void compute(const Kernel& k, OrtKernelContext* context) {
  size_t n_in = 0;
  check(g_api->KernelContext_GetInputCount(context, &n_in), "KernelContext_GetInputCount");
  if (n_in != 2) throw Error{"expects 2 inputs (X, LAM), got " + std::to_string(n_in)};
  const OrtValue *xv = nullptr, *lv = nullptr;
  check(g_api->KernelContext_GetInput(context, 0, &xv), "KernelContext_GetInput");
  check(g_api->KernelContext_GetInput(context, 1, &lv), "KernelContext_GetInput");
  if (xv == nullptr || lv == nullptr) throw Error{"X and LAM are both required"};
  const Shape xs = shape_of(xv), lsh = shape_of(lv);
  const size_t D = static_cast<size_t>(k.dims), rank = D + 2;
  if (xs.type != k.type || lsh.type != k.type)
    throw Error{std::string("X and LAM must both be ") + type_name(k.type) + ", got X " + type_name(xs.type) +
                " and LAM " + type_name(lsh.type)};
  if (xs.dims.size() != rank)
    throw Error{"X must be " + std::to_string(rank) + "-D [N, C, " + (D == 3 ? "T, " : "") + "H, W], got shape " +
                ints(xs.dims)};
  std::vector<int64_t> out_dims(xs.dims.begin(), xs.dims.begin() + 2);
  for (size_t d = 0; d < D; ++d) {
    if (xs.dims[2 + d] < 1)  // an empty dim: no window has an input position (the eager op refuses it too)
      throw Error{"X of shape " + ints(xs.dims) + " has an empty spatial dim: no window fits"};
    const int64_t o = output_length(xs.dims[2 + d], k.kernel[d], k.strides[d], k.pads[d], k.pads[D + d], k.ceil_mode);
    if (o < 1)
      throw Error{"X of shape " + ints(xs.dims) + " is too small for kernel_shape " + ints(k.kernel) + " with pads " +
                  ints(k.pads) + ": no window fits"};
    out_dims.push_back(o);
  }
  if (lsh.dims.size() != rank)
    throw Error{"LAM must be " + std::to_string(rank) + "-D like X, got shape " + ints(lsh.dims)};
  // LAM is read as Tensor[N, C, OT, OH, OW] through strides, 0 where it broadcasts (size 1).
  std::vector<int64_t> lam_strides(rank, 0);
  int64_t stride = 1;
  for (size_t i = rank; i-- > 0;) {
    if (lsh.dims[i] != 1 && lsh.dims[i] != out_dims[i])
      throw Error{"LAM of shape " + ints(lsh.dims) + " does not broadcast to the output shape " + ints(out_dims) +
                  " (each dim must be 1 or the output's)"};
    lam_strides[i] = lsh.dims[i] == 1 ? 0 : stride;
    stride *= lsh.dims[i];
  }
  OrtValue* yv = nullptr;
  check(g_api->KernelContext_GetOutput(context, 0, out_dims.data(), out_dims.size(), &yv), "KernelContext_GetOutput");
  const int64_t outputs = count(out_dims);
  if (outputs == 0) return;  // N or C is 0
  void *x = nullptr, *lam = nullptr, *y = nullptr;
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(xv), &x), "GetTensorMutableData");
  check(g_api->GetTensorMutableData(const_cast<OrtValue*>(lv), &lam), "GetTensorMutableData");
  check(g_api->GetTensorMutableData(yv, &y), "GetTensorMutableData");

  const int64_t N = xs.dims[0], C = xs.dims[1];
  const bool is3 = D == 3;
  const int64_t T = is3 ? xs.dims[2] : 1, H = xs.dims[rank - 2], W = xs.dims[rank - 1];
  const int64_t OT = is3 ? out_dims[2] : 1, OH = out_dims[rank - 2], OW = out_dims[rank - 1];
  const int64_t KT = is3 ? k.kernel[0] : 1, ST = is3 ? k.strides[0] : 1, PT = is3 ? k.pads[0] : 0;
  const int64_t geo[18] = {N, C, T, H, W, OT, OH, OW, KT, k.kernel[D - 2], k.kernel[D - 1],
                           ST, k.strides[D - 2], k.strides[D - 1], PT, k.pads[D - 2], k.pads[D - 1], C};
  const int64_t ls[5] = {lam_strides[0], lam_strides[1], is3 ? lam_strides[2] : 0, lam_strides[rank - 2],
                         lam_strides[rank - 1]};
  // The kernel's per-thread buffer: (2 K + 4) values per column of a block of at least 64 windows.
  if ((2 * count(k.kernel) + 4) * (OW + 64) > kMaxBufferValues)
    throw Error{"kernel_shape " + ints(k.kernel) + " on an output " + std::to_string(OW) +
                " wide needs a buffer over " + std::to_string(kMaxBufferValues) + " values per thread"};

  const bool half = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 || k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  const bool bf16 = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  std::vector<float> xf, lf, yf;  // float16/bfloat16: the float32 copies the kernel computes on
  if (half) {
    xf = widen(x, count(xs.dims), bf16);
    lf = widen(lam, count(lsh.dims), bf16);
    yf.resize(static_cast<size_t>(outputs));
  }
  Job job;
  job.x = half ? xf.data() : x;
  job.lam = half ? lf.data() : lam;
  job.y = half ? yf.data() : y;
  job.geo = geo;
  job.ls = ls;
  job.f64 = k.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  job.tasks = gfgp_maxent_num_tasks(geo, 0);
  if (outputs < gfgp_maxent_parallel_min_outputs() || job.tasks < 2) {
    job.chunks = 1;  // waking threads costs more than it saves
    run_chunk(&job, 0);
  } else {
    job.chunks = job.tasks < kMaxChunks ? job.tasks : kMaxChunks;
    check(g_api->KernelContext_ParallelFor(context, run_chunk, static_cast<size_t>(job.chunks), 0, &job),
          "KernelContext_ParallelFor");
  }
  if (job.failed) throw std::bad_alloc();
  if (half) narrow(yf, y, bf16);
}

// ------------------------------------------------------------------ the OrtCustomOp callbacks
struct Op {
  OrtCustomOp base;  // first: onnxruntime passes &base, cast back to Op
  const char* name;
  int dims;
  ONNXTensorElementDataType type;
};

const Op& op_of(const OrtCustomOp* op) { return *reinterpret_cast<const Op*>(op); }

// Runs body() and turns what it throws into a status naming the op: nothing crosses the C boundary.
template <typename F>
OrtStatus* guarded(const std::string& op_name, F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Error& e) {
    return to_status(op_name, e.message, ORT_INVALID_ARGUMENT);
  } catch (const std::bad_alloc&) {
    return to_status(op_name, "out of memory", ORT_RUNTIME_EXCEPTION);
  } catch (...) {
    return to_status(op_name, "unexpected error", ORT_RUNTIME_EXCEPTION);
  }
}

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info, void** out) {
  const Op& o = op_of(op);
  *out = nullptr;
  return guarded(o.name, [&] {
    Kernel* k = new Kernel();
    k->op_name = o.name;
    k->dims = o.dims;
    k->type = o.type;
    try {
      read_attributes(info, *k);
    } catch (...) {
      delete k;
      throw;
    }
    *out = k;
  });
}

OrtStatus* compute_kernel(void* kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<const Kernel*>(kernel);
  return guarded(k.op_name, [&] { compute(k, context); });
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }
const char* get_name(const OrtCustomOp* op) { return op_of(op).name; }
const char* get_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType get_type(const OrtCustomOp* op, size_t) { return op_of(op).type; }
size_t two(const OrtCustomOp*) { return 2; }
size_t one(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int arity(const OrtCustomOp*) { return 1; }
int homogeneous(const OrtCustomOp*) { return 1; }
int since_version(const OrtCustomOp*) { return 1; }  // domain version 1 (maxent_function.DOMAIN_VERSION)
int end_version(const OrtCustomOp*) { return 1; }

Op make_op(const char* name, int dims, ONNXTensorElementDataType type) {
  Op o{};
  OrtCustomOp& b = o.base;
  b.version = kApiVersion;
  b.CreateKernel = nullptr;  // CreateKernelV2 and KernelComputeV2 are used (version >= 16)
  b.GetName = get_name;
  b.GetExecutionProviderType = get_provider;
  b.GetInputType = get_type;
  b.GetInputTypeCount = two;
  b.GetOutputType = get_type;
  b.GetOutputTypeCount = one;
  b.KernelCompute = nullptr;
  b.KernelDestroy = destroy_kernel;
  b.GetInputCharacteristic = required;
  b.GetOutputCharacteristic = required;
  b.GetInputMemoryType = memory_type;
  b.GetVariadicInputMinArity = arity;
  b.GetVariadicInputHomogeneity = homogeneous;
  b.GetVariadicOutputMinArity = arity;
  b.GetVariadicOutputHomogeneity = homogeneous;
  b.CreateKernelV2 = create_kernel;
  b.KernelComputeV2 = compute_kernel;
  b.InferOutputShapeFn = nullptr;
  b.GetStartVersion = since_version;
  b.GetEndVersion = end_version;
  o.name = name;
  o.dims = dims;
  o.type = type;
  return o;
}

// One op per (op type, element type): onnxruntime merges them into one schema per op type, whose
// type constraint is these four types. A registered library replaces the model-local function's
// schema, so every type a gfgp file may hold must be here (float16: gfgp export --fp16). Made on
// first registration, not when the library is loaded: nothing of this build's instruction set runs
// before the CPU check below.
Op* ops(size_t* n) {
  static Op table[] = {
      make_op("MaxEntPool2d", 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
      make_op("MaxEntPool2d", 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE),
      make_op("MaxEntPool2d", 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
      make_op("MaxEntPool2d", 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16),
      make_op("MaxEntPool3d", 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT),
      make_op("MaxEntPool3d", 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE),
      make_op("MaxEntPool3d", 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16),
      make_op("MaxEntPool3d", 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16),
  };
  *n = sizeof(table) / sizeof(table[0]);
  return table;
}

std::mutex g_mutex;
OrtCustomOpDomain* g_domain = nullptr;  // one for every session, alive until the process ends

OrtStatus* register_ops(OrtSessionOptions* options, const OrtApi* api) noexcept {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_api == nullptr) g_api = api;  // written once, before any session of ours exists
    if (g_domain == nullptr) {
      OrtCustomOpDomain* domain = nullptr;
      if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
      size_t n = 0;
      Op* table = ops(&n);
      for (size_t i = 0; i < n; ++i)
        if (OrtStatus* st = api->CustomOpDomain_Add(domain, &table[i].base)) return st;  // domain leaked: rare, tiny
      g_domain = domain;
    }
    return api->AddCustomOpDomain(options, g_domain);
  } catch (...) {  // std::system_error from the mutex
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, "gfgp: cannot register the kernels (mutex)");
  }
}

// The baseline x86-64 instruction set only: it runs on any x86-64 CPU, and says (instead of the
// process dying of an illegal instruction) when this library was built with -march=native for a
// CPU with features this one lacks. The features a compiler uses for its vector code are checked.
#if defined(__x86_64__) && defined(__GNUC__)
#define GFGP_BASELINE __attribute__((target("arch=x86-64")))
GFGP_BASELINE const char* missing_cpu_feature() {
#define GFGP_NEEDS(macro_defined, name) \
  if (macro_defined && !__builtin_cpu_supports(name)) return name;
#ifdef __AVX512F__
  GFGP_NEEDS(1, "avx512f")
#endif
#ifdef __AVX512BW__
  GFGP_NEEDS(1, "avx512bw")
#endif
#ifdef __AVX512DQ__
  GFGP_NEEDS(1, "avx512dq")
#endif
#ifdef __AVX512VL__
  GFGP_NEEDS(1, "avx512vl")
#endif
#ifdef __AVX2__
  GFGP_NEEDS(1, "avx2")
#endif
#ifdef __FMA__
  GFGP_NEEDS(1, "fma")
#endif
#ifdef __AVX__
  GFGP_NEEDS(1, "avx")
#endif
#ifdef __BMI2__
  GFGP_NEEDS(1, "bmi2")
#endif
#ifdef __SSE4_2__
  GFGP_NEEDS(1, "sse4.2")
#endif
#ifdef GFGP_TEST_REQUIRE_CPU_FEATURE  // tests: a feature this CPU lacks, to see the refusal
  GFGP_NEEDS(1, GFGP_TEST_REQUIRE_CPU_FEATURE)
#endif
#undef GFGP_NEEDS
  return nullptr;
}
#else
#define GFGP_BASELINE
const char* missing_cpu_feature() { return nullptr; }
#endif

}  // namespace

// Registers the gfgp domain's kernels on `options`. The domain object is created once and kept for
// the life of the process (onnxruntime requires it to outlive every session that uses it). Built
// for the baseline instruction set (GFGP_BASELINE): the CPU check runs before any other code of
// the library, and everything past it runs in register_ops.
GFGP_EXPORT GFGP_BASELINE OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  if (api_base == nullptr || options == nullptr) return nullptr;  // nothing to report the error through
  const OrtApi* api = api_base->GetApi(kApiVersion);
  if (api == nullptr) {  // an onnxruntime older than 1.17: report through its first API version
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 == nullptr ? nullptr
                         : v1->CreateStatus(ORT_FAIL, "the gfgp kernel library needs onnxruntime >= 1.17 (C API version 17)");
  }
  if (const char* feature = missing_cpu_feature()) {
    char msg[320];
    std::snprintf(msg, sizeof(msg),
                  "gfgp: this kernel library was built (-march=native) for a CPU with %s, which this CPU lacks: "
                  "build the library on this machine (gfgp_cli.export.ort_kernel.library_path())",
                  feature);
    return api->CreateStatus(ORT_FAIL, msg);
  }
  return register_ops(options, api);
}
