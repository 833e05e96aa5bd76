#pragma once
// The projection weights shared by the multi-head attention layers and the
// GEMMs that apply them (docs/math.md §1: per head h, q_t = W_q,h e_t,
// k_t = W_k,h e_t, v_t = W_v,h e_t, and the layer output
// Delta e_t = sum_h P_h o_{h,t}; no biases).
//
// Layout (row-major, torch.nn.Linear-style (out, in) weights):
//   W_q (H d, D), W_k (H d, D), W_v (H dv, D): row h*d + i of W_q gives
//     component i of head h's query; stored stacked in one matrix
//     W_qkv = [W_q; W_k; W_v] of (H (2d + dv), D) so that one GEMM projects
//     all three: QKV = X W_qkv^T, (N, H (2d + dv)), one token per row;
//     head h's q, k, v are the column blocks starting at q_col(h), k_col(h),
//     v_col(h).
//   W_o (D, H dv): P_h is its column block [h dv, (h+1) dv), so
//     Delta E = O W_o^T with O (N, H dv) the heads' outputs side by side.
//
// Work partition (see threading.hpp): on several threads, token GEMMs in
// chunks of detail::kTokenChunk rows and weight-gradient GEMMs in blocks of
// detail::kWeightRowBlock weight rows (each a full reduction over all N
// tokens by one thread); on one thread, each product in one call. The
// products are kernels::gemm / gemm_tn, whose entries are each one chain of
// FMAs however the rows are cut (kernels/gemm.hpp), so the bits are the same
// for any thread count. One call on one thread: fewer partial row blocks (a
// shard of 400 tokens in chunks of 128 left a 2-row and a 16-row block per
// product). X W^T needs W^T row-major: each call transposes the weight once
// into a per-thread buffer (detail::transposed_in_thread_buffer; 4,800
// entries for the paper's W_qkv).
#include <mesaopt/common/check.hpp>
#include <mesaopt/common/matrix.hpp>
#include <mesaopt/common/parameters.hpp>
#include <mesaopt/layers/threading.hpp>
#include <mesaopt/common/random.hpp>
#include <mesaopt/kernels/gemm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace mesaopt::detail {

inline constexpr long kTokenChunk = 128;
inline constexpr long kWeightRowBlock = 32;

// Calls body(r0, n) for pieces [r0, r0 + n) covering rows [0, rows): pieces of
// `piece` rows spread over `threads` threads, or one piece on one thread.
template <class Body>
void for_row_pieces(long rows, long piece, int threads, Body&& body) {
  if (threads <= 1) {
    if (rows > 0) body(0L, rows);
    return;
  }
  parallel_for_rethrow(num_chunks(rows, piece), threads, [&](std::ptrdiff_t c) {
    const long r0 = long(c) * piece;
    body(r0, std::min(piece, rows - r0));
  });
}

// Throws unless every size is >= 1.
inline void check_attention_sizes(const char* where, long D, long H, long d, long dv) {
  check_positive_size(where, "config.D (model width)", D);
  check_positive_size(where, "config.H (heads)", H);
  check_positive_size(where, "config.d (key size)", d);
  check_positive_size(where, "config.dv (value size)", dv);
}

// Throws unless stddev is finite and >= 0.
inline void check_init_stddev(const char* where, double stddev) {
  if (!(std::isfinite(stddev) && stddev >= 0)) fail(where, "stddev must be finite and >= 0, got ", stddev);
}

// Checks x (B*T, D) with sequence length seq_len and returns B.
template <class T>
long check_layer_input(const char* where, const ConstMatrixRef<T>& x, long seq_len, long D) {
  check_positive_size(where, "T (sequence length)", seq_len);
  if (x.cols() != D) fail(where, "x has ", x.cols(), " columns but config.D is ", D, " (expected equal)");
  if (x.rows() < 1 || x.rows() % seq_len != 0)
    fail(where, "x has ", x.rows(), " rows, which is not a positive multiple of T = ", seq_len,
         " (x must be (B*T, D), sequence-major)");
  return x.rows() / seq_len;
}

// Checks the arguments of a layer backward against the cache of its forward.
template <class T>
long check_layer_backward_args(const char* where, const ConstMatrixRef<T>& x, long seq_len,
                               const ConstMatrixRef<T>& dy, const MatrixRef<T>& dx, long D, long cache_B,
                               long cache_T) {
  const long B = check_layer_input<T>(where, x, seq_len, D);
  if (cache_B != B || cache_T != seq_len)
    fail(where, "cache holds B = ", cache_B, ", T = ", cache_T, " but x gives B = ", B, ", T = ", seq_len,
         " (run forward on the same x first)");
  check_shape(where, "dy", dy, x.rows(), D);
  check_shape(where, "dx", dx, x.rows(), D);
  return B;
}

}  // namespace mesaopt::detail

namespace mesaopt {

// Base of the attention layers: owns W_q, W_k, W_v (stacked) and W_o with their
// gradient buffers and applies them. The public part gives read/write views of
// each weight and gradient (e.g. layer.W_q() = ...; layer.grad_W_o()); the
// GEMMs are for the layers.
template <class T>
class AttentionProjections {
 public:
  using MatrixMap = Eigen::Map<RowMatrix<T>>;
  using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;

  // W_q (H d, D), W_k (H d, D), W_v (H dv, D), W_o (D, H dv) and the gradients.
  MatrixMap W_q() { return MatrixMap(qkv_.data(), H_ * d_, D_); }
  MatrixMap W_k() { return MatrixMap(qkv_.data() + H_ * d_ * D_, H_ * d_, D_); }
  MatrixMap W_v() { return MatrixMap(qkv_.data() + 2 * H_ * d_ * D_, H_ * dv_, D_); }
  MatrixMap W_o() { return MatrixMap(out_.data(), D_, H_ * dv_); }
  ConstMatrixMap W_q() const { return ConstMatrixMap(qkv_.data(), H_ * d_, D_); }
  ConstMatrixMap W_k() const { return ConstMatrixMap(qkv_.data() + H_ * d_ * D_, H_ * d_, D_); }
  ConstMatrixMap W_v() const { return ConstMatrixMap(qkv_.data() + 2 * H_ * d_ * D_, H_ * dv_, D_); }
  ConstMatrixMap W_o() const { return ConstMatrixMap(out_.data(), D_, H_ * dv_); }
  MatrixMap grad_W_q() { return MatrixMap(qkv_grad_.data(), H_ * d_, D_); }
  MatrixMap grad_W_k() { return MatrixMap(qkv_grad_.data() + H_ * d_ * D_, H_ * d_, D_); }
  MatrixMap grad_W_v() { return MatrixMap(qkv_grad_.data() + 2 * H_ * d_ * D_, H_ * dv_, D_); }
  MatrixMap grad_W_o() { return MatrixMap(out_grad_.data(), D_, H_ * dv_); }

 protected:
  AttentionProjections() = default;
  AttentionProjections(long D, long H, long d, long dv)
      : D_(D), H_(H), d_(d), dv_(dv),
        qkv_(RowMatrix<T>::Zero(H * (2 * d + dv), D)), qkv_grad_(RowMatrix<T>::Zero(H * (2 * d + dv), D)),
        out_(RowMatrix<T>::Zero(D, H * dv)), out_grad_(RowMatrix<T>::Zero(D, H * dv)) {}

  long width() const { return H_ * (2 * d_ + dv_); }  // columns of QKV
  long q_col(long h) const { return h * d_; }
  long k_col(long h) const { return H_ * d_ + h * d_; }
  long v_col(long h) const { return 2 * H_ * d_ + h * dv_; }

  // W_q, W_k, W_v, W_o (in this order) ~ N(0, stddev^2), drawn from rng.
  void init_weights(SplitMix64& rng, double stddev) {
    fill_normal(qkv_.data(), static_cast<std::size_t>(qkv_.size()), stddev, rng);  // W_q, W_k, W_v
    fill_normal(out_.data(), static_cast<std::size_t>(out_.size()), stddev, rng);  // W_o
  }

  void weight_parameters(std::vector<ParameterView<T>>& views, const std::string& prefix) {
    const long nq = H_ * d_ * D_, nv = H_ * dv_ * D_;
    views.push_back({prefix + "W_q", qkv_.data(), qkv_grad_.data(), std::size_t(nq), {H_ * d_, D_}});
    views.push_back({prefix + "W_k", qkv_.data() + nq, qkv_grad_.data() + nq, std::size_t(nq), {H_ * d_, D_}});
    views.push_back(
        {prefix + "W_v", qkv_.data() + 2 * nq, qkv_grad_.data() + 2 * nq, std::size_t(nv), {H_ * dv_, D_}});
    views.push_back({prefix + "W_o", out_.data(), out_grad_.data(), std::size_t(out_.size()), {D_, H_ * dv_}});
  }

  // qkv_out (N, width()) = x (N, D) W_qkv^T.
  void project_qkv(const ConstMatrixRef<T>& x, RowMatrix<T>& qkv_out, int threads) const {
    const long N = x.rows(), W = width();
    qkv_out.resize(N, W);
    const T* w_t = detail::transposed_in_thread_buffer(qkv_);  // W_qkv^T (D, width())
    detail::for_row_pieces(N, detail::kTokenChunk, threads, [&](long r0, long n) {
      kernels::gemm<T>(std::size_t(n), std::size_t(W), std::size_t(D_), x.data() + r0 * x.outerStride(),
                       std::size_t(x.outerStride()), w_t, std::size_t(W), qkv_out.data() + r0 * W,
                       std::size_t(W), false);
    });
  }

  // y (N, D) = o (N, H dv) W_o^T: Delta e_t = sum_h P_h o_{h,t} (docs/math.md §1).
  void project_out(const RowMatrix<T>& o, MatrixRef<T> y, int threads) const {
    const long N = o.rows(), Hdv = out_.cols();
    const T* w_t = detail::transposed_in_thread_buffer(out_);  // W_o^T (H dv, D)
    detail::for_row_pieces(N, detail::kTokenChunk, threads, [&](long r0, long n) {
      kernels::gemm<T>(std::size_t(n), std::size_t(D_), std::size_t(Hdv), o.data() + r0 * Hdv, std::size_t(Hdv),
                       w_t, std::size_t(D_), y.data() + r0 * y.outerStride(), std::size_t(y.outerStride()),
                       false);
    });
  }

  // forward: Y = O W_o^T  =>  dO = dY W_o (written), dW_o += dY^T O (added).
  // Two loops, not one over both kinds of item: parallel_for splits items into
  // contiguous equal-count ranges, which balances only items of equal cost.
  void backward_out(const ConstMatrixRef<T>& dy, const RowMatrix<T>& o, RowMatrix<T>& d_o, int threads) {
    const long N = o.rows(), Hdv = out_.cols();
    const std::size_t ldy = std::size_t(dy.outerStride());
    d_o.resize(N, Hdv);
    detail::for_row_pieces(N, detail::kTokenChunk, threads, [&](long r0, long n) {
      kernels::gemm<T>(std::size_t(n), std::size_t(Hdv), std::size_t(D_), dy.data() + r0 * ldy, ldy, out_.data(),
                       std::size_t(Hdv), d_o.data() + r0 * Hdv, std::size_t(Hdv), false);
    });
    detail::for_row_pieces(D_, detail::kWeightRowBlock, threads, [&](long r0, long n) {
      kernels::gemm_tn<T>(std::size_t(n), std::size_t(Hdv), std::size_t(N), dy.data() + r0, ldy, o.data(),
                          std::size_t(Hdv), out_grad_.data() + r0 * Hdv, std::size_t(Hdv), true);
    });
  }

  // forward: QKV = X W_qkv^T  =>  dX = dQKV W_qkv (written), dW_qkv += dQKV^T X (added).
  void backward_qkv(const ConstMatrixRef<T>& x, const RowMatrix<T>& dqkv, MatrixRef<T> dx, int threads) {
    const long N = x.rows(), W = width();
    const std::size_t ldx = std::size_t(x.outerStride()), lddx = std::size_t(dx.outerStride());
    detail::for_row_pieces(N, detail::kTokenChunk, threads, [&](long r0, long n) {
      kernels::gemm<T>(std::size_t(n), std::size_t(D_), std::size_t(W), dqkv.data() + r0 * W, std::size_t(W),
                       qkv_.data(), std::size_t(D_), dx.data() + r0 * lddx, lddx, false);
    });
    detail::for_row_pieces(W, detail::kWeightRowBlock, threads, [&](long r0, long n) {
      kernels::gemm_tn<T>(std::size_t(n), std::size_t(D_), std::size_t(N), dqkv.data() + r0, std::size_t(W),
                          x.data(), ldx, qkv_grad_.data() + r0 * D_, std::size_t(D_), true);
    });
  }

  // Backward scratch kept between calls (no re-allocation, no fresh pages):
  // dL/dO (N, H dv) and dL/dQKV (N, width()).
  RowMatrix<T> scratch_d_o_, scratch_dqkv_;

 private:
  long D_ = 0, H_ = 0, d_ = 0, dv_ = 0;
  RowMatrix<T> qkv_, qkv_grad_;  // W_qkv = [W_q; W_k; W_v], (H (2d + dv), D)
  RowMatrix<T> out_, out_grad_;  // W_o, (D, H dv)
};

}  // namespace mesaopt
