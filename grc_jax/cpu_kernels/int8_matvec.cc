// y[r, o] = scale[o] * sum_k x[r, k] * q[o, k]: a few activation rows times a weight stored as
// int8 rows with one float scale per row (grc_jax/quantize.py's Int8Weight), for decode on a CPU.
//
// Why native: XLA:CPU has no fast mixed or int8 matrix product; every int8 form it compiles is
// 11-20x slower than its float32 dot (benchmarks/RESULTS.md). Decode at a small batch reads each
// weight byte once per token, so the kernel streams the int8 rows once, converts them to float in
// registers and multiplies every activation row by each weight row while that row is in L1.
// The output rows are split into chunks that XLA's intra-op thread pool and the calling thread
// take in turn.
//
// Built by grc_jax/cpu_kernels/int8_matvec.py with the host compiler (-O3 -march=native), which
// vectorizes the inner loop; the XLA reference beside it is quantize.int8_dense's float path.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Weight rows at a time: four independent sums per activation row keep the vector units busy
// (one sum would wait on its own multiply-add each step), and each activation row is read once
// for the four.
constexpr int64_t kOutBlock = 4;

void MatvecRows(const float* x, const int8_t* q, const float* scale, float* y, int64_t rows, int64_t in,
                int64_t out, int64_t o_begin, int64_t o_end) {
  int64_t o = o_begin;
  for (; o + kOutBlock <= o_end; o += kOutBlock) {
    const int8_t* w0 = q + (o + 0) * in;
    const int8_t* w1 = q + (o + 1) * in;
    const int8_t* w2 = q + (o + 2) * in;
    const int8_t* w3 = q + (o + 3) * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      for (int64_t k = 0; k < in; ++k) {
        const float xk = xr[k];
        a0 += xk * static_cast<float>(w0[k]);
        a1 += xk * static_cast<float>(w1[k]);
        a2 += xk * static_cast<float>(w2[k]);
        a3 += xk * static_cast<float>(w3[k]);
      }
      float* yr = y + r * out + o;
      yr[0] = a0 * scale[o + 0];
      yr[1] = a1 * scale[o + 1];
      yr[2] = a2 * scale[o + 2];
      yr[3] = a3 * scale[o + 3];
    }
  }
  for (; o < o_end; ++o) {
    const int8_t* w = q + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      float a = 0.f;
      for (int64_t k = 0; k < in; ++k) a += xr[k] * static_cast<float>(w[k]);
      y[r * out + o] = a * scale[o];
    }
  }
}

// What the chunks share; held by every scheduled task, so a task the pool starts late (after the
// caller has done every chunk and returned) still finds it alive.
struct Work {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t rows, in, out, chunk, num_chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Drain() {
    for (int64_t c = next.fetch_add(1); c < num_chunks; c = next.fetch_add(1)) {
      const int64_t begin = c * chunk;
      MatvecRows(x, q, scale, y, rows, in, out, begin, std::min(out, begin + chunk));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || scale.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("int8_matvec: x [rows, in], q [out, in] and scale [out] expected");
  }
  const int64_t rows = xd[0], in = xd[1], out = qd[0];
  if (qd[1] != in || scale.dimensions()[0] != out) {
    return ffi::Error::InvalidArgument("int8_matvec: x, q and scale disagree on in or out");
  }
  // Chunks of 64 output rows or more, a few per thread so that a slow thread is not waited on.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads()) + 1;
  const int64_t chunk = std::max<int64_t>(64, (out + 4 * threads - 1) / (4 * threads));
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->q = q.typed_data();
  work->scale = scale.typed_data();
  work->y = y->typed_data();
  work->rows = rows;
  work->in = in;
  work->out = out;
  work->chunk = chunk;
  work->num_chunks = (out + chunk - 1) / chunk;
  const int64_t helpers = std::min(threads - 1, work->num_chunks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrcInt8Matvec, Int8Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
