// Fused max-entropy pooling on the CPU (docs/method.md section 1): one pass over the input per direction.
// One implementation for both ranks: 3-D pooling over [N, C, T, H, W], and 2-D pooling over
// [N, C, H, W] as the 3-D problem with T = OT = KT = ST = 1 and PT = 0 (the extra loop level has
// one iteration).
//
// Plain C++ with no PyTorch headers, compiled at run time by gfgp_cli/ops/cpu.py (g++, cached by
// source hash) and called through ctypes (which releases the GIL). Work is split into tasks and
// run with OpenMP on the number of threads the caller passes (torch.get_num_threads()). The
// library links libgomp.so.1 by soname, so in a process where PyTorch has loaded its libgomp it
// runs on PyTorch's own OpenMP thread pool: no second pool competes with PyTorch's spinning
// workers. Built without OpenMP (a compiler without it), every call runs on the calling thread.
//
// Geometry array `geo` (int64): N, C, T, H, W, OT, OH, OW, KT, KH, KW, ST, SH, SW, PT, PH, PW, CB
// (CB: the NHWC channel block).
// lam is read as Tensor[N, C, OT, OH, OW] through 5 strides `ls` (0 where lam broadcasts); a
// per-window dL/dlam is written through 5 strides `gs`.
// Layouts: NCHW (x, y, g, gx contiguous [N, C, T, H, W]; one task per (n, c) plane) and NHWC
// (channels last, [N, T, H, W, C] in memory: channels_last for 4-D tensors, channels_last_3d for
// 5-D ones; one task per (n, block of CB channels)). Padded positions take part in nothing.
//
// Per window (stable for every finite input: m is the true window maximum of lam * x):
//   e_i = exp(lam x_i - m),  S = sum e_i,  y = sum e_i x_i / S
//   dL/dx_i += g e_i / S (1 + lam (x_i - y)),   dL/dlam += g sum_i e_i / S (x_i - y)^2

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

// exp(xc) / 2^fx for fx = round(xc log2(e)): Cephes expf's Cody-Waite reduction r = xc - fx ln 2
// (ln 2 in two parts) and its degree-6 polynomial of r; one body for floats and float vectors.
template <typename T>
inline T exp_reduced(T xc, T fx) {
  T r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const T r2 = r * r;
  T p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r2 + r + 1.0f;
}

// exp for arguments <= 0 (Cephes expf: Cody-Waite range reduction and a degree-6 polynomial,
// about 1 ulp); arguments below -87.3 give 0 (exp underflows there), -inf gives 0, NaN stays NaN.
// Written branch-free so that GCC vectorises the loops that inline it.
inline float exp_nonpos(float x) {
  const float lo = -87.33654475f;
  float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  // round(xc * log2(e)) by the 1.5 * 2^23 trick (round to nearest even, no libm call)
  float fx = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float p = exp_reduced(xc, fx);
  int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  float res = p * pow2;
  return x < lo ? 0.0f : res;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// ------------------------------------------------------------------ explicit float vectors
// The NHWC float loops below are written on GCC/clang generic vectors of kLanes floats (the
// widest the target has: AVX-512 16, AVX 8, else 4; the compiler lowers them to what it has).
// A generic vector is one register, so a window's per-channel state (lam, max, sums) stays in
// registers across the window's positions instead of going through memory once per position, as
// the auto-vectorised loops over buffers do; the vector width does not depend on GCC's
// -mprefer-vector-width (256 on most AVX-512 targets) either. Every lane does the same
// operations in the same order as the scalar code, so the results are the same bits.
#if defined(__GNUC__)
#define GFGP_VEC 1
#if defined(__AVX512F__)
#define GFGP_VEC_BYTES 64
#elif defined(__AVX__)
#define GFGP_VEC_BYTES 32
#else
#define GFGP_VEC_BYTES 16
#endif
typedef float vf __attribute__((vector_size(GFGP_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(GFGP_VEC_BYTES)));
constexpr int64_t kLanes = GFGP_VEC_BYTES / sizeof(float);

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf vsplat(float a) { return vf{} + a; }

// exp_nonpos(float) lane by lane, with the same results bit for bit, in fewer instructions:
// - the argument is lam x - m <= 0 or NaN (m is the maximum of the lam x), so the clamp at 88
//   changes nothing and is left out;
// - fx = round(t), t = xc log2(e) in [-126, 0], is a single rounding instruction where there
//   is one (SSE4.1, AVX, AVX-512: round to nearest even, as the 1.5 * 2^23 trick);
// - with AVX-512, p 2^fx is one vscalefps (p 2^fx correctly rounded, as the product with the
//   exact power 2^fx built from the exponent bits, for fx >= -126).
inline vf exp_nonpos(vf x) {
  const vf lo = vsplat(-87.33654475f);
  const vf xc = x < lo ? lo : x;
  const vf t = xc * 1.44269504088896341f;
#if defined(__AVX512F__)
  const vf fx = (vf)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  const vf fx = (vf)_mm256_round_ps((__m256)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__SSE4_1__)
  const vf fx = (vf)_mm_round_ps((__m128)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf fx = (t + 12582912.0f) - 12582912.0f;
#endif
  const vf p = exp_reduced(xc, fx);
#if defined(__AVX512F__)
  const vf res = (vf)_mm512_scalef_ps((__m512)p, (__m512)fx);
#else
  const vi bits = (__builtin_convertvector(fx, vi) + 127) << 23;
  vf pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  const vf res = p * pow2;
#endif
  return x < lo ? vsplat(0.0f) : res;
}
#endif

constexpr int64_t kMaxChannelBlock = 256;  // NHWC: at most this many channels per task

struct Geo {
  int64_t N, C, T, H, W, OT, OH, OW, KT, KH, KW, ST, SH, SW, PT, PH, PW, CB;
  explicit Geo(const int64_t* g)
      : N(g[0]), C(g[1]), T(g[2]), H(g[3]), W(g[4]), OT(g[5]), OH(g[6]), OW(g[7]), KT(g[8]), KH(g[9]),
        KW(g[10]), ST(g[11]), SH(g[12]), SW(g[13]), PT(g[14]), PH(g[15]), PW(g[16]),
        CB(std::max<int64_t>(1, std::min(g[17], kMaxChannelBlock))) {}
  int64_t K() const { return KT * KH * KW; }      // positions per window
  int64_t rows() const { return OT * OH; }        // output rows (ot, oh) per plane
  int64_t in_plane() const { return T * H * W; }  // input positions per (n, c)
  int64_t out_plane() const { return OT * OH * OW; }
};


// ---------------------------------------------------------------------------------- NCHW
// An output row is the pair (ot, oh), numbered i = ot * OH + oh (the rows of a plane are
// contiguous in y in that order). For one output row i of one plane, gather every window offset
// q = (ct, a, b) of every window j into contiguous rows zb[q][j] = lam x (-inf where padded) and
// xb[q][j] = x (0 where padded), so that the arithmetic below runs over contiguous memory and
// vectorises. The column strides 1 and 2 get their own instantiations (S > 0): with the stride
// known the compiler vectorises the loads.

// The windows j in [j0, j1) whose column j * sw + off lies inside [0, W).
inline void inner_range(int64_t off, int64_t sw, int64_t W, int64_t OW, int64_t& j0, int64_t& j1) {
  j0 = off < 0 ? (-off + sw - 1) / sw : 0;
  j1 = W - 1 - off < 0 ? 0 : std::min(OW, (W - 1 - off) / sw + 1);
  if (j1 < j0) j1 = j0;
}

template <typename T, int S>
void gather_cols(const T* __restrict__ src, const T* __restrict__ lr, T* __restrict__ z, T* __restrict__ xv,
                 int64_t j0, int64_t j1, int64_t sw) {
  const int64_t st = S > 0 ? S : sw;
  for (int64_t j = j0; j < j1; ++j) {
    const T v = src[j * st];
    xv[j] = v;
    z[j] = lr[j] * v;
  }
}

template <typename T>
void gather_row(const T* xp, const T* lamrow, const Geo& g, int64_t i, T* zb, T* xb, int64_t qs) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t ot = i / g.OH, oh = i % g.OH;
  for (int64_t ct = 0; ct < g.KT; ++ct) {
    const int64_t f = ot * g.ST + ct - g.PT;  // input frame
    const bool frame_ok = f >= 0 && f < g.T;
    for (int64_t a = 0; a < g.KH; ++a) {
      const int64_t r = oh * g.SH + a - g.PH;
      const bool row_ok = frame_ok && r >= 0 && r < g.H;
      for (int64_t b = 0; b < g.KW; ++b) {
        const int64_t q = (ct * g.KH + a) * g.KW + b;
        T* z = zb + q * qs;
        T* xv = xb + q * qs;
        int64_t j0 = 0, j1 = 0;
        if (row_ok) inner_range(b - g.PW, g.SW, g.W, g.OW, j0, j1);
        std::fill(z, z + j0, neg_inf);
        std::fill(xv, xv + j0, T(0));
        std::fill(z + j1, z + g.OW, neg_inf);
        std::fill(xv + j1, xv + g.OW, T(0));
        if (j1 <= j0) continue;
        const T* src = xp + (f * g.H + r) * g.W + (b - g.PW);
        if (g.SW == 1)
          gather_cols<T, 1>(src, lamrow, z, xv, j0, j1, 1);
        else if (g.SW == 2)
          gather_cols<T, 2>(src, lamrow, z, xv, j0, j1, 2);
        else
          gather_cols<T, 0>(src, lamrow, z, xv, j0, j1, g.SW);
      }
    }
  }
}

// The transpose of gather_row for one input row: row[j * SW + b - PW] += eb[b][j] for every
// window j and column offset b. Column c' = c + PW = t * SW + phi receives from b = phi + SW * u,
// j = t - u; phase sums P_phi[t] are accumulated from contiguous rows of eb, then interleaved into
// the row (vectorised for SW 1 and 2).
template <typename T, int S>
void scatter_phases(T* __restrict__ row, const T* __restrict__ ph, int64_t nt, int64_t W, int64_t PW, int64_t sw) {
  const int64_t st = S > 0 ? S : sw;
  // t ranges over full groups of st columns inside [0, W); the partial groups at both ends are scalar.
  const int64_t t_lo = (PW + st - 1) / st, t_hi = std::min(nt, (W + PW) / st);
  for (int64_t t = 0; t < std::min(t_lo, nt); ++t)
    for (int64_t phi = 0; phi < st; ++phi) {
      const int64_t col = t * st + phi - PW;
      if (col >= 0 && col < W) row[col] += ph[phi * nt + t];
    }
  T* base = row - PW;
  for (int64_t t = t_lo; t < t_hi; ++t)
    for (int64_t phi = 0; phi < st; ++phi) base[t * st + phi] += ph[phi * nt + t];
  for (int64_t t = std::max(t_hi, t_lo); t < nt; ++t)
    for (int64_t phi = 0; phi < st; ++phi) {
      const int64_t col = t * st + phi - PW;
      if (col >= 0 && col < W) row[col] += ph[phi * nt + t];
    }
}

template <typename T>
void scatter_row(T* row, const T* eb, const Geo& g, T* ph, int64_t qs) {
  const int64_t sw = g.SW, nt = g.OW + (g.KW - 1) / sw + 1;  // t = j + u < OW + ceil(KW / SW)
  std::fill(ph, ph + sw * nt, T(0));
  for (int64_t b = 0; b < g.KW; ++b) {
    T* p = ph + (b % sw) * nt + b / sw;  // P_phi[j + u] += eb[b][j]
    const T* e = eb + b * qs;
    for (int64_t j = 0; j < g.OW; ++j) p[j] += e[j];
  }
  if (sw == 1)
    scatter_phases<T, 1>(row, ph, nt, g.W, g.PW, 1);
  else if (sw == 2)
    scatter_phases<T, 2>(row, ph, nt, g.W, g.PW, 2);
  else
    scatter_phases<T, 0>(row, ph, nt, g.W, g.PW, sw);
}

// e (in place of zb) and S for OW gathered windows (window offset q at zb + q * qs); returns through s.
template <typename T>
void weights_row(int64_t K, int64_t OW, int64_t qs, T* __restrict__ zb, T* __restrict__ m, T* __restrict__ s) {
  std::copy(zb, zb + OW, m);
  for (int64_t q = 1; q < K; ++q) {
    const T* z = zb + q * qs;
    for (int64_t j = 0; j < OW; ++j) m[j] = z[j] > m[j] ? z[j] : m[j];
  }
  std::fill(s, s + OW, T(0));
  for (int64_t q = 0; q < K; ++q) {
    T* z = zb + q * qs;
    for (int64_t j = 0; j < OW; ++j) {
      z[j] = exp_nonpos(z[j] - m[j]);
      s[j] += z[j];
    }
  }
}

// lam of the windows of output row i = (ot, oh) of plane (n, c).
template <typename T>
void lam_row(const T* lam, const int64_t* ls, const Geo& g, int64_t n, int64_t c, int64_t i, T* out) {
  const T* base = lam + n * ls[0] + c * ls[1] + (i / g.OH) * ls[2] + (i % g.OH) * ls[3];
  for (int64_t j = 0; j < g.OW; ++j) out[j] = base[j * ls[4]];
}

// Output rows per block: narrow maps (deep layers, OW of 7 or 14) are processed several rows at a
// time, their windows side by side in one vector of about kMinBlock, so the loops stay vectorised.
// A block may span frames (rows (ot, OH - 1) and (ot + 1, 0) are neighbours).
constexpr int64_t kMinBlock = 64;
inline int64_t rows_per_block(const Geo& g) {
  if (g.OW <= 0) return 1;  // an empty output: the loops below do nothing
  return std::max<int64_t>(1, std::min<int64_t>(g.rows(), (kMinBlock + g.OW - 1) / g.OW));
}

// Gather the windows of output rows [i, i + R) of one plane: row r's windows at [r OW, (r+1) OW)
// of each window offset's vector (stride qs), lam likewise in lr.
template <typename T>
void gather_block(const T* xp, const T* lam, const int64_t* ls, const Geo& g, int64_t n, int64_t c, int64_t i,
                  int64_t R, int64_t qs, T* zb, T* xb, T* lr) {
  for (int64_t r = 0; r < R; ++r) {
    lam_row(lam, ls, g, n, c, i + r, lr + r * g.OW);
    gather_row(xp, lr + r * g.OW, g, i + r, zb + r * g.OW, xb + r * g.OW, qs);
  }
}

template <typename T>
void forward_nchw(const T* x, const T* lam, T* y, const Geo& g, const int64_t* ls, int64_t t0, int64_t t1) {
  const int64_t K = g.K(), RB = rows_per_block(g), qs = RB * g.OW, rows = g.rows();
  std::vector<T> buf((2 * K + 4) * qs);
  T *zb = buf.data(), *xb = zb + K * qs, *m = xb + K * qs, *s = m + qs, *acc = s + qs, *lr = acc + qs;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / g.C, c = t % g.C;
    const T* xp = x + t * g.in_plane();
    T* yp = y + t * g.out_plane();
    for (int64_t i = 0; i < rows; i += RB) {
      const int64_t R = std::min(RB, rows - i), len = R * g.OW;
      gather_block(xp, lam, ls, g, n, c, i, R, qs, zb, xb, lr);
      weights_row(K, len, qs, zb, m, s);
      std::fill(acc, acc + len, T(0));
      for (int64_t q = 0; q < K; ++q) {
        const T *e = zb + q * qs, *xv = xb + q * qs;
        for (int64_t j = 0; j < len; ++j) acc[j] += e[j] * xv[j];
      }
      for (int64_t j = 0; j < len; ++j) yp[i * g.OW + j] = acc[j] / s[j];
    }
  }
}

// gl: per-window dL/dlam through strides gs (per_window) or one sum per (n, c) plane (gl[n*C + c]).
template <typename T>
void backward_nchw(const T* x, const T* lam, const T* y, const T* gy, T* gx, T* gl, const Geo& g, const int64_t* ls,
                   const int64_t* gs, bool per_window, int64_t t0, int64_t t1) {
  const int64_t K = g.K(), RB = rows_per_block(g), qs = RB * g.OW, rows = g.rows();
  const int64_t nph = g.SW * (g.OW + (g.KW - 1) / g.SW + 1);  // scatter_row's phase sums
  std::vector<T> buf((2 * K + 6) * qs + nph);
  T *zb = buf.data(), *xb = zb + K * qs, *m = xb + K * qs, *s = m + qs, *v = s + qs, *lr = v + qs,
    *gp = lr + qs, *vcol = gp + qs, *ph = vcol + qs;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / g.C, c = t % g.C;
    const T* xp = x + t * g.in_plane();
    const T* yp = y + t * g.out_plane();
    const T* gyp = gy + t * g.out_plane();
    T* gxp = gx + t * g.in_plane();
    std::fill(gxp, gxp + g.in_plane(), T(0));
    std::fill(vcol, vcol + qs, T(0));  // per-column sums of dL/dlam (vectorised; summed at the end)
    for (int64_t i = 0; i < rows; i += RB) {
      const int64_t R = std::min(RB, rows - i), len = R * g.OW;
      gather_block(xp, lam, ls, g, n, c, i, R, qs, zb, xb, lr);
      weights_row(K, len, qs, zb, m, s);
      const T* yr = yp + i * g.OW;
      for (int64_t j = 0; j < len; ++j) gp[j] = gyp[i * g.OW + j] / s[j];  // g / S
      std::fill(v, v + len, T(0));
      for (int64_t q = 0; q < K; ++q) {
        T *e = zb + q * qs, *xv = xb + q * qs;
        for (int64_t j = 0; j < len; ++j) {
          const T d = xv[j] - yr[j];       // x_i - y (padded: e = 0, so no contribution)
          const T w = gp[j] * e[j];        // g p_i
          v[j] += w * d * d;
          e[j] = w * (T(1) + lr[j] * d);   // dL/dx_i from this window, scattered below
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t ot = (i + r) / g.OH, oh = (i + r) % g.OH;
        for (int64_t ct = 0; ct < g.KT; ++ct) {
          const int64_t f = ot * g.ST + ct - g.PT;
          if (f < 0 || f >= g.T) continue;
          for (int64_t a = 0; a < g.KH; ++a) {
            const int64_t row = oh * g.SH + a - g.PH;
            if (row >= 0 && row < g.H)
              scatter_row(gxp + (f * g.H + row) * g.W, zb + (ct * g.KH + a) * g.KW * qs + r * g.OW, g, ph, qs);
          }
        }
      }
      if (per_window) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t ot = (i + r) / g.OH, oh = (i + r) % g.OH;
          T* out = gl + n * gs[0] + c * gs[1] + ot * gs[2] + oh * gs[3];
          for (int64_t j = 0; j < g.OW; ++j) out[j * gs[4]] = v[r * g.OW + j];
        }
      } else {
        for (int64_t j = 0; j < len; ++j) vcol[j] += v[j];
      }
    }
    if (!per_window) {
      double plane = 0.0;
      for (int64_t j = 0; j < qs; ++j) plane += vcol[j];
      gl[t] = static_cast<T>(plane);
    }
  }
}

// ---------------------------------------------------------------------------------- NHWC
// Memory order [N, T, H, W, C]. One task = (n, block of channels [c0, c0 + L)); tasks own
// disjoint channels, so backward's scatter never races. Channels are contiguous in memory.
// float (GFGP_VEC): each window is computed one vector of kLanes channels at a time over all its
// positions, the vector's state (lam, max, sums) in registers (forward_lanes, backward_lanes).
// double, or a compiler without generic vectors: one window position at a time over all L
// channels of the block (long, independent, auto-vectorised loops), the per-channel state in
// small L1-resident buffers.
// Measured on AVX-512 (2x2x2 stride 2, 128 channels), float against the buffer loops: forward
// 0.55x and backward 0.5x the time. The buffer loops were bound by the loads and stores of the
// state once per position and by -mprefer-vector-width=256; what is left is mostly the
// arithmetic of exp (about 30 instructions per vector and position; -ffp-contract=off keeps
// FMA out, for the same bits as the NCHW path). Channel blocks smaller than C cost much more
// than they save (128 channels as 2 blocks of 64: forward 1.15x, backward 1.4x the time; each
// position's channels stop filling whole runs of cache lines), so _channel_block in cpu.py keeps
// whole channel ranges when there are tasks enough.
template <typename T>
void lam_block(const T* lam, const int64_t* ls, int64_t n, int64_t c0, int64_t L, int64_t ot, int64_t oh, int64_t ow,
               T* out) {
  const T* base = lam + n * ls[0] + c0 * ls[1] + ot * ls[2] + oh * ls[3] + ow * ls[4];
  for (int64_t c = 0; c < L; ++c) out[c] = base[c * ls[1]];
}

// Whether window (ot, oh, ow) is the first, in the order the windows are visited (ot, then oh,
// then ow), to cover its position (ct, a, b): the windows that cover a position form a box of
// consecutive indices in every dim, the earliest at the box's corner, and window o - 1 covers
// offset a of window o exactly when a + stride < kernel.
inline bool first_cover(const Geo& g, int64_t ot, int64_t oh, int64_t ow, int64_t ct, int64_t a, int64_t b) {
  return (ot == 0 || ct + g.ST >= g.KT) && (oh == 0 || a + g.SH >= g.KH) && (ow == 0 || b + g.SW >= g.KW);
}

// Offsets (from channel c0 of the sample) of every valid position of window (ot, oh, ow), and
// there whether the window is the first to cover it (first_cover); returns how many.
inline int64_t window_offsets(const Geo& g, int64_t ot, int64_t oh, int64_t ow, int64_t* off, char* first) {
  int64_t nq = 0;
  for (int64_t ct = 0; ct < g.KT; ++ct) {
    const int64_t f = ot * g.ST + ct - g.PT;
    if (f < 0 || f >= g.T) continue;
    for (int64_t a = 0; a < g.KH; ++a) {
      const int64_t r = oh * g.SH + a - g.PH;
      if (r < 0 || r >= g.H) continue;
      for (int64_t b = 0; b < g.KW; ++b) {
        const int64_t col = ow * g.SW + b - g.PW;
        if (col < 0 || col >= g.W) continue;
        first[nq] = first_cover(g, ot, oh, ow, ct, a, b);
        off[nq++] = ((f * g.H + r) * g.W + col) * g.C;
      }
    }
  }
  return nq;
}

// The valid positions of window (ot, oh, ow) as offsets from xc + base. An interior window (all
// of it inside the input: the most, for small kernels without padding) takes the offsets of a
// full window from its first position, computed once, and base = that first position; a window
// that meets the border lists its valid positions (window_offsets) with base = 0. Likewise the
// first_cover flags of the positions: for an interior window one of 8 precomputed patterns (which
// of ot, oh, ow are 0).
class Windows {
 public:
  explicit Windows(const Geo& g) : g_(g), full_(g.K()), full_first_(8 * g.K()), off_(g.K()), first_(g.K()) {
    const int64_t K = g.K();
    int64_t q = 0;
    for (int64_t ct = 0; ct < g.KT; ++ct)
      for (int64_t a = 0; a < g.KH; ++a)
        for (int64_t b = 0; b < g.KW; ++b, ++q) {
          full_[q] = ((ct * g.H + a) * g.W + b) * g.C;
          for (int64_t pat = 0; pat < 8; ++pat)  // bit 2: ot == 0, bit 1: oh == 0, bit 0: ow == 0
            full_first_[pat * K + q] = first_cover(g, (pat >> 2) & 1 ? 0 : 1, (pat >> 1) & 1 ? 0 : 1, pat & 1 ? 0 : 1,
                                                   ct, a, b);
        }
  }
  // Returns the number of valid positions; their offsets in *offs, their first_cover flags in *first.
  int64_t at(int64_t ot, int64_t oh, int64_t ow, const int64_t** offs, int64_t* base, const char** first) {
    const int64_t f = ot * g_.ST - g_.PT, r = oh * g_.SH - g_.PH, c = ow * g_.SW - g_.PW;
    if (f >= 0 && f + g_.KT <= g_.T && r >= 0 && r + g_.KH <= g_.H && c >= 0 && c + g_.KW <= g_.W) {
      *base = ((f * g_.H + r) * g_.W + c) * g_.C;
      *offs = full_.data();
      *first = full_first_.data() + ((ot == 0) * 4 + (oh == 0) * 2 + (ow == 0)) * g_.K();
      return g_.K();
    }
    *base = 0;
    *offs = off_.data();
    *first = first_.data();
    return window_offsets(g_, ot, oh, ow, off_.data(), first_.data());
  }

 private:
  const Geo& g_;
  std::vector<int64_t> full_;
  std::vector<char> full_first_;
  std::vector<int64_t> off_;
  std::vector<char> first_;
};

// GCC's unroll-and-jam (on at -O3) fuses two window positions q of the buffer loops below
// (window_max, window_forward, window_backward: double, or no GFGP_VEC) and then loads the second
// position's channels with gather instructions instead of plain vector loads (about 20% slower);
// it is switched off for this section only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-loop-unroll-and-jam")
#endif

// m[v] = the maximum of lam * x over the nq valid positions of one window, for the task's L channels.
template <typename T>
inline void window_max(const T* __restrict__ xc, const int64_t* off, int64_t nq, const T* __restrict__ lb, int64_t L,
                       T* __restrict__ m) {
  {
    const T* __restrict__ p = xc + off[0];
    for (int64_t v = 0; v < L; ++v) m[v] = lb[v] * p[v];
  }
  for (int64_t q = 1; q < nq; ++q) {
    const T* __restrict__ p = xc + off[q];
    for (int64_t v = 0; v < L; ++v) {
      const T z = lb[v] * p[v];
      m[v] = z > m[v] ? z : m[v];
    }
  }
}

// Forward of one window for the task's L channels (xc: channel c0 of the sample; off: the
// window's valid positions): m = max lam x, then S = sum e and sum e x; out = sum e x / S.
template <typename T>
inline void window_forward(const T* __restrict__ xc, const int64_t* off, int64_t nq, const T* __restrict__ lb,
                           T* __restrict__ out, int64_t L, T* __restrict__ m, T* __restrict__ s,
                           T* __restrict__ acc) {
  window_max(xc, off, nq, lb, L, m);
  for (int64_t v = 0; v < L; ++v) s[v] = acc[v] = T(0);
  for (int64_t q = 0; q < nq; ++q) {
    const T* __restrict__ p = xc + off[q];
    for (int64_t v = 0; v < L; ++v) {
      const T xv = p[v];
      const T e = exp_nonpos(lb[v] * xv - m[v]);
      s[v] += e;
      acc[v] += e * xv;
    }
  }
  for (int64_t v = 0; v < L; ++v) out[v] = acc[v] / s[v];
}

// Backward of one window for the task's L channels: gx = dL/dx at the positions this window is
// the first to cover (first[q]; every position when !Add: windows that share no position), else
// gx += dL/dx; v_out = g sum_i p_i (x_i - y)^2. eb holds the nq rows of e (stride L).
template <typename T, bool Add>
inline void window_backward(const T* __restrict__ xc, T* __restrict__ gxc, const int64_t* off, const char* first,
                            int64_t nq,
                            const T* __restrict__ lb, const T* __restrict__ yv, const T* __restrict__ gv,
                            T* __restrict__ eb, T* __restrict__ v_out, int64_t L, T* __restrict__ m,
                            T* __restrict__ s) {
  window_max(xc, off, nq, lb, L, m);
  for (int64_t v = 0; v < L; ++v) s[v] = T(0);
  for (int64_t q = 0; q < nq; ++q) {
    const T* __restrict__ p = xc + off[q];
    T* __restrict__ e = eb + q * L;
    for (int64_t v = 0; v < L; ++v) {
      e[v] = exp_nonpos(lb[v] * p[v] - m[v]);
      s[v] += e[v];
    }
  }
  for (int64_t v = 0; v < L; ++v) {
    s[v] = gv[v] / s[v];  // g / S, in place of S
    v_out[v] = T(0);
  }
  for (int64_t q = 0; q < nq; ++q) {
    const T* __restrict__ p = xc + off[q];
    T* __restrict__ gp = gxc + off[q];
    const T* __restrict__ e = eb + q * L;
    const bool add = Add && !first[q];
    for (int64_t v = 0; v < L; ++v) {
      const T d = p[v] - yv[v];  // x_i - y
      const T w = s[v] * e[v];   // g p_i
      v_out[v] += w * d * d;
      const T gxv = w * (T(1) + lb[v] * d);
      gp[v] = add ? gp[v] + gxv : (Add ? T(0) + gxv : gxv);  // 0 + : the bits of accumulating into zeros
    }
  }
}

#ifdef GFGP_VEC
// The window maximum of lam * x for kLanes channels from v (lanes_max) or for channel v alone
// (channel_max): the first pass of forward_lanes and backward_lanes. Inlined into each, so with a
// compile-time nq the loads stay in registers for the exponentials that follow.
inline vf lanes_max(const float* __restrict__ xc, const int64_t* off, int64_t nq, vf lam, int64_t v) {
  vf mx = lam * vload(xc + off[0] + v);
  for (int64_t q = 1; q < nq; ++q) {
    const vf z = lam * vload(xc + off[q] + v);
    mx = z > mx ? z : mx;
  }
  return mx;
}

inline float channel_max(const float* __restrict__ xc, const int64_t* off, int64_t nq, float lam, int64_t v) {
  float mv = lam * xc[off[0] + v];
  for (int64_t q = 1; q < nq; ++q) {
    const float z = lam * xc[off[q] + v];
    mv = z > mv ? z : mv;
  }
  return mv;
}

// The float windows of the NHWC path, kLanes channels at a time with the window's state in
// registers. NQ > 0: the window has NQ valid positions, known at compile time (the common full
// windows: 2x2, 3x3, 2x2x2), so the loops over positions unroll and the inputs loaded for the
// maximum stay in registers for the exponentials; NQ = 0: nq positions. The channels past the
// last full vector run the scalar loops (the same operations, so the same bits).
template <int NQ>
inline void forward_lanes(const float* __restrict__ xc, const int64_t* off, int64_t nq_rt,
                          const float* __restrict__ lb, float* __restrict__ out, int64_t L) {
  const int64_t nq = NQ > 0 ? NQ : nq_rt;
  int64_t v = 0;
  for (; v + kLanes <= L; v += kLanes) {
    const vf lam = vload(lb + v);
    const vf mx = lanes_max(xc, off, nq, lam, v);
    vf sum = vsplat(0.0f), num = vsplat(0.0f);
    for (int64_t q = 0; q < nq; ++q) {
      const vf xv = vload(xc + off[q] + v);
      const vf e = exp_nonpos(lam * xv - mx);
      sum += e;
      num += e * xv;
    }
    vstore(out + v, num / sum);
  }
  for (; v < L; ++v) {
    const float mv = channel_max(xc, off, nq, lb[v], v);
    float sum = 0.0f, num = 0.0f;
    for (int64_t q = 0; q < nq; ++q) {
      const float xv = xc[off[q] + v];
      const float e = exp_nonpos(lb[v] * xv - mv);
      sum += e;
      num += e * xv;
    }
    out[v] = num / sum;
  }
}

// Backward likewise; e of the window's positions goes to eb (kLanes per position).
template <int NQ, bool Add>
inline void backward_lanes(const float* __restrict__ xc, float* __restrict__ gxc, const int64_t* off,
                           const char* first, int64_t nq_rt,
                           const float* __restrict__ lb, const float* __restrict__ yv, const float* __restrict__ gv,
                           float* __restrict__ eb, float* __restrict__ v_out, int64_t L) {
  const int64_t nq = NQ > 0 ? NQ : nq_rt;
  int64_t v = 0;
  for (; v + kLanes <= L; v += kLanes) {
    const vf lam = vload(lb + v);
    const vf mx = lanes_max(xc, off, nq, lam, v);
    vf sum = vsplat(0.0f);
    for (int64_t q = 0; q < nq; ++q) {
      const vf e = exp_nonpos(lam * vload(xc + off[q] + v) - mx);
      sum += e;
      vstore(eb + q * kLanes, e);
    }
    const vf gs = vload(gv + v) / sum;  // g / S
    const vf y = vload(yv + v);
    vf acc = vsplat(0.0f);
    for (int64_t q = 0; q < nq; ++q) {
      const vf d = vload(xc + off[q] + v) - y;   // x_i - y
      const vf w = gs * vload(eb + q * kLanes);  // g p_i
      acc += w * d * d;
      const vf gxv = w * (1.0f + lam * d);
      float* gp = gxc + off[q] + v;
      vstore(gp, Add ? (first[q] ? 0.0f + gxv : vload(gp) + gxv) : gxv);
    }
    vstore(v_out + v, acc);
  }
  for (; v < L; ++v) {
    const float mv = channel_max(xc, off, nq, lb[v], v);
    float sum = 0.0f;
    for (int64_t q = 0; q < nq; ++q) {
      const float e = exp_nonpos(lb[v] * xc[off[q] + v] - mv);
      sum += e;
      eb[q] = e;
    }
    const float gs = gv[v] / sum;
    float acc = 0.0f;
    for (int64_t q = 0; q < nq; ++q) {
      const float d = xc[off[q] + v] - yv[v];
      const float w = gs * eb[q];
      acc += w * d * d;
      const float gxv = w * (1.0f + lb[v] * d);
      float* gp = gxc + off[q] + v;
      *gp = Add ? (first[q] ? 0.0f + gxv : *gp + gxv) : gxv;
    }
    v_out[v] = acc;
  }
}

template <>
inline void window_forward<float>(const float* __restrict__ xc, const int64_t* off, int64_t nq,
                                  const float* __restrict__ lb, float* __restrict__ out, int64_t L, float* __restrict__,
                                  float* __restrict__, float* __restrict__) {
  switch (nq) {
    case 4: return forward_lanes<4>(xc, off, nq, lb, out, L);
    case 8: return forward_lanes<8>(xc, off, nq, lb, out, L);
    case 9: return forward_lanes<9>(xc, off, nq, lb, out, L);
    default: return forward_lanes<0>(xc, off, nq, lb, out, L);
  }
}

template <bool Add>
inline void backward_f32(const float* xc, float* gxc, const int64_t* off, const char* first, int64_t nq,
                         const float* lb, const float* yv, const float* gv, float* eb, float* v_out, int64_t L) {
  switch (nq) {
    case 4: return backward_lanes<4, Add>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
    case 8: return backward_lanes<8, Add>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
    case 9: return backward_lanes<9, Add>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
    default: return backward_lanes<0, Add>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
  }
}

template <>
inline void window_backward<float, true>(const float* __restrict__ xc, float* __restrict__ gxc, const int64_t* off,
                                         const char* first, int64_t nq, const float* __restrict__ lb, const float* __restrict__ yv,
                                         const float* __restrict__ gv, float* __restrict__ eb,
                                         float* __restrict__ v_out, int64_t L, float* __restrict__, float* __restrict__) {
  backward_f32<true>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
}
template <>
inline void window_backward<float, false>(const float* __restrict__ xc, float* __restrict__ gxc, const int64_t* off,
                                          const char* first, int64_t nq, const float* __restrict__ lb, const float* __restrict__ yv,
                                          const float* __restrict__ gv, float* __restrict__ eb,
                                          float* __restrict__ v_out, int64_t L, float* __restrict__,
                                          float* __restrict__) {
  backward_f32<false>(xc, gxc, off, first, nq, lb, yv, gv, eb, v_out, L);
}
#endif

template <typename T>
void forward_nhwc(const T* x, const T* lam, T* y, const Geo& g, const int64_t* ls, int64_t t0, int64_t t1) {
  const int64_t nb = (g.C + g.CB - 1) / g.CB;
  Windows windows(g);
  std::vector<T> lb(g.CB), st(3 * g.CB);
  const bool lam_per_window = ls[2] != 0 || ls[3] != 0 || ls[4] != 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / nb, c0 = (t % nb) * g.CB, L = std::min(g.CB, g.C - c0);
    const T* xn = x + n * g.in_plane() * g.C + c0;
    if (!lam_per_window) lam_block(lam, ls, n, c0, L, 0, 0, 0, lb.data());
    for (int64_t ot = 0; ot < g.OT; ++ot)
      for (int64_t i = 0; i < g.OH; ++i) {
        for (int64_t j = 0; j < g.OW; ++j) {
          if (lam_per_window) lam_block(lam, ls, n, c0, L, ot, i, j, lb.data());
          const int64_t* off = nullptr;
          int64_t base = 0;
          const char* first = nullptr;
          const int64_t nq = windows.at(ot, i, j, &off, &base, &first);
          T* out = y + (((n * g.OT + ot) * g.OH + i) * g.OW + j) * g.C + c0;
          window_forward(xn + base, off, nq, lb.data(), out, L, st.data(), st.data() + g.CB, st.data() + 2 * g.CB);
        }
      }
  }
}

// Marks the positions of one dim that some window covers (the rest get no gradient).
inline std::vector<char> covered(int64_t size, int64_t out, int64_t k, int64_t s, int64_t p) {
  std::vector<char> cov(size, 0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = std::max<int64_t>(0, o * s - p); i < std::min(size, o * s - p + k); ++i) cov[i] = 1;
  return cov;
}

template <typename T>
void backward_nhwc(const T* x, const T* lam, const T* y, const T* gy, T* gx, T* gl, const Geo& g, const int64_t* ls,
                   const int64_t* gs, bool per_window, int64_t t0, int64_t t1) {
  const int64_t K = g.K(), nb = (g.C + g.CB - 1) / g.CB;
  Windows windows(g);
  std::vector<T> lb(g.CB), vrow(g.CB), eb(K * g.CB), st(2 * g.CB);
  std::vector<double> plane(g.CB);
  const bool lam_per_window = ls[2] != 0 || ls[3] != 0 || ls[4] != 0;
  // gx is not zeroed first: the first window to cover a position (first_cover) stores 0 + its
  // dL/dx there, the later ones add theirs (the same sums in the same order, so the same bits, as
  // accumulating into zeros). Windows that share no position (stride >= kernel in
  // every dim, e.g. 2x2 stride 2) are all first. Positions no window covers are zeroed (a gap
  // between windows, or the end of a dim that floor mode leaves out).
  const bool disjoint = g.ST >= g.KT && g.SH >= g.KH && g.SW >= g.KW;
  const std::vector<char> cov_t = covered(g.T, g.OT, g.KT, g.ST, g.PT), cov_h = covered(g.H, g.OH, g.KH, g.SH, g.PH),
                          cov_w = covered(g.W, g.OW, g.KW, g.SW, g.PW);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / nb, c0 = (t % nb) * g.CB, L = std::min(g.CB, g.C - c0);
    const T* xn = x + n * g.in_plane() * g.C + c0;
    T* gxn = gx + n * g.in_plane() * g.C + c0;
    for (int64_t f = 0; f < g.T; ++f)
      for (int64_t r = 0; r < g.H; ++r)
        for (int64_t col = 0; col < g.W; ++col)
          if (!(cov_t[f] && cov_h[r] && cov_w[col]))
            std::fill_n(gxn + ((f * g.H + r) * g.W + col) * g.C, L, T(0));
    std::fill(plane.begin(), plane.end(), 0.0);
    if (!lam_per_window) lam_block(lam, ls, n, c0, L, 0, 0, 0, lb.data());
    for (int64_t ot = 0; ot < g.OT; ++ot)
      for (int64_t i = 0; i < g.OH; ++i) {
        for (int64_t j = 0; j < g.OW; ++j) {
          if (lam_per_window) lam_block(lam, ls, n, c0, L, ot, i, j, lb.data());
          const int64_t* off = nullptr;
          const char* first = nullptr;
          int64_t base = 0;
          const int64_t nq = windows.at(ot, i, j, &off, &base, &first);
          const int64_t o = (((n * g.OT + ot) * g.OH + i) * g.OW + j) * g.C + c0;
          if (disjoint)
            window_backward<T, false>(xn + base, gxn + base, off, first, nq, lb.data(), y + o, gy + o, eb.data(),
                                      vrow.data(), L, st.data(), st.data() + g.CB);
          else
            window_backward<T, true>(xn + base, gxn + base, off, first, nq, lb.data(), y + o, gy + o, eb.data(),
                                     vrow.data(), L, st.data(), st.data() + g.CB);
          if (per_window) {
            T* out = gl + n * gs[0] + c0 * gs[1] + ot * gs[2] + i * gs[3] + j * gs[4];
            for (int64_t cc = 0; cc < L; ++cc) out[cc * gs[1]] = vrow[cc];
          } else {
            for (int64_t cc = 0; cc < L; ++cc) plane[cc] += vrow[cc];
          }
        }
      }
    if (!per_window)
      for (int64_t cc = 0; cc < L; ++cc) gl[n * g.C + c0 + cc] = static_cast<T>(plane[cc]);
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

int64_t num_tasks(const Geo& g, int nhwc) {
  return nhwc ? g.N * ((g.C + g.CB - 1) / g.CB) : g.N * g.C;
}

// Below this many output elements one thread does the whole call (waking threads costs more).
constexpr int64_t kParallelMinOutputs = 1 << 14;

// body(t0, t1) over [0, ntasks): a few chunks per thread, handed out dynamically, so a thread the
// OS delays (a busy machine) leaves its share to the others.
template <typename F>
void parallel_tasks(int64_t ntasks, int64_t outputs, int threads, F&& body) {
  const int64_t workers = std::min<int64_t>(threads, ntasks);
#ifdef _OPENMP
  if (workers > 1 && outputs >= kParallelMinOutputs) {
    const int64_t chunks = std::min<int64_t>(ntasks, 4 * workers);
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(workers))
    for (int64_t k = 0; k < chunks; ++k) body(ntasks * k / chunks, ntasks * (k + 1) / chunks);
    return;
  }
#endif
  (void)workers;
  (void)outputs;
  body(0, ntasks);
}

}  // namespace

extern "C" {

// 1 if this build runs tasks on OpenMP threads, 0 if every call runs on the calling thread.
int gfgp_maxent_has_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

#define GFGP_DEFINE(T, SUFFIX)                                                                                 \
  void gfgp_maxent_forward_##SUFFIX(const T* x, const T* lam, T* y, const int64_t* geo, const int64_t* ls,     \
                                    int nhwc, int threads) {                                                   \
    const Geo g(geo);                                                                                          \
    parallel_tasks(num_tasks(g, nhwc), g.N * g.C * g.out_plane(), threads, [&](int64_t t0, int64_t t1) {         \
      if (nhwc)                                                                                                \
        forward_nhwc<T>(x, lam, y, g, ls, t0, t1);                                                             \
      else                                                                                                     \
        forward_nchw<T>(x, lam, y, g, ls, t0, t1);                                                             \
    });                                                                                                        \
  }                                                                                                            \
  void gfgp_maxent_backward_##SUFFIX(const T* x, const T* lam, const T* y, const T* gy, T* gx, T* gl,          \
                                     const int64_t* geo, const int64_t* ls, const int64_t* gs, int per_window, \
                                     int nhwc, int threads) {                                                  \
    const Geo g(geo);                                                                                          \
    parallel_tasks(num_tasks(g, nhwc), g.N * g.C * g.out_plane(), threads, [&](int64_t t0, int64_t t1) {         \
      if (nhwc)                                                                                                \
        backward_nhwc<T>(x, lam, y, gy, gx, gl, g, ls, gs, per_window != 0, t0, t1);                           \
      else                                                                                                     \
        backward_nchw<T>(x, lam, y, gy, gx, gl, g, ls, gs, per_window != 0, t0, t1);                           \
    });                                                                                                        \
  }

GFGP_DEFINE(float, f32)
GFGP_DEFINE(double, f64)

// For callers that run the tasks on their own thread pool (gfgp_cli/export/csrc/ort_maxent_op.cpp,
// on onnxruntime's intra-op pool): the number of tasks of a forward call, the output count below
// which one thread should do the whole call, and the forward pass over the tasks [t0, t1) only.
// Calling the task entry over [0, gfgp_maxent_num_tasks) in any split computes exactly what
// gfgp_maxent_forward_* computes (the tasks write disjoint outputs).
int64_t gfgp_maxent_num_tasks(const int64_t* geo, int nhwc) { return num_tasks(Geo(geo), nhwc); }

int64_t gfgp_maxent_parallel_min_outputs() { return kParallelMinOutputs; }

#define GFGP_DEFINE_TASKS(T, SUFFIX)                                                                      \
  void gfgp_maxent_forward_tasks_##SUFFIX(const T* x, const T* lam, T* y, const int64_t* geo,             \
                                          const int64_t* ls, int nhwc, int64_t t0, int64_t t1) {          \
    const Geo g(geo);                                                                                     \
    if (nhwc)                                                                                             \
      forward_nhwc<T>(x, lam, y, g, ls, t0, t1);                                                          \
    else                                                                                                  \
      forward_nchw<T>(x, lam, y, g, ls, t0, t1);                                                          \
  }

GFGP_DEFINE_TASKS(float, f32)
GFGP_DEFINE_TASKS(double, f64)

}  // extern "C"
