// The mix y + sum_k w_k h_k as one autograd node written in C++.
//
// Same arithmetic and gradient routing as the Python `_Mix` / `StackGradients`
// in mhc_torch/skip.py (read that first); this version exists only because a
// Python autograd.Function costs ~20 us of interpreter time per layer in
// forward and backward, which in a 50-layer stack is most of the gap to a
// plain residual. Built on first use by mhc_torch/_native.py; when it cannot
// be built the Python version runs instead.

#include <torch/extension.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

using torch::autograd::Node;
using torch::autograd::variable_list;

// ---------------------------------------------------------------------------
// Fused CPU loops for contiguous float32/float64 tensors. In a deep stack the
// states come from cold cache; ATen's addcmul/dot/mul chain passes over each
// tensor once per op (and dispatches each op), these loops once per layer.
// Elements are processed in blocks small enough to stay in L1, so every inner
// loop is a plain stride-1 loop the compiler vectorises.

constexpr int64_t kBlock = 2048;
// Below this many blocks per thread, one thread: ATen's elementwise grain.
constexpr int64_t kGrainBlocks = 32768 / kBlock;

template <typename T>
void fused_mix(T* out, const T* y, const std::vector<const T*>& h, const std::vector<T>& w, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      const T* h0 = h[0];
      const T w0 = w[0];
      for (int64_t i = lo; i < hi; ++i) out[i] = y[i] + h0[i] * w0;
      for (size_t k = 1; k < h.size(); ++k) {
        const T* hk = h[k];
        const T wk = w[k];
        for (int64_t i = lo; i < hi; ++i) out[i] += hk[i] * wk;
      }
    }
  });
}

// dots[k] = <h_k, g> (when want_dot[k]); dst[k] = w_k g or dst[k] += w_k g
// (when dst[k] is set). The dot products are summed block by block and then
// over blocks in a fixed order, so the result does not depend on the threads.
template <typename T>
void fused_mix_backward(
    const T* g,
    const std::vector<const T*>& h,
    const std::vector<T>& w,
    const std::vector<bool>& want_dot,
    const std::vector<T*>& dst,
    const std::vector<bool>& accumulate,
    std::vector<T>& dots,
    int64_t n) {
  const size_t k = h.size();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<T> partial(blocks * k, T(0));
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    constexpr int kLanes = 16;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      for (size_t j = 0; j < k; ++j) {
        if (want_dot[j]) {
          const T* hj = h[j];
          T lanes[kLanes] = {};
          int64_t i = lo;
          for (; i + kLanes <= hi; i += kLanes) {
            for (int l = 0; l < kLanes; ++l) lanes[l] += hj[i + l] * g[i + l];
          }
          T sum = 0;
          for (; i < hi; ++i) sum += hj[i] * g[i];
          for (int l = 0; l < kLanes; ++l) sum += lanes[l];
          partial[b * k + j] = sum;
        }
        if (T* d = dst[j]) {
          const T wj = w[j];
          if (accumulate[j]) {
            for (int64_t i = lo; i < hi; ++i) d[i] += g[i] * wj;
          } else {
            for (int64_t i = lo; i < hi; ++i) d[i] = g[i] * wj;
          }
        }
      }
    }
  });
  dots.assign(k, T(0));
  for (int64_t b = 0; b < blocks; ++b) {
    for (size_t j = 0; j < k; ++j) dots[j] += partial[b * k + j];
  }
}

// The fused loops apply when every tensor is a contiguous CPU float32/float64
// tensor of one dtype and size (0-d weights); anything else takes ATen ops.
#ifdef MHC_FUSED_LOOPS  // set by _native.py when the build targets AVX2 (see there)
bool g_fused_loops = true;
#else
bool g_fused_loops = false;
#endif

// A tensor whose memory the loops may read directly: dense, on the CPU, and
// not a tensor subclass or fake tensor (those must see every op).
bool raw_cpu(const at::Tensor& t, at::ScalarType dtype) {
  return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() && t.scalar_type() == dtype &&
      !t.key_set().has(c10::DispatchKey::Python);
}

bool fusable(const at::Tensor& ref, const std::vector<at::Tensor>& same, const std::vector<at::Tensor>& scalars) {
  const auto dtype = ref.scalar_type();
  if (!g_fused_loops || (dtype != at::kFloat && dtype != at::kDouble)) return false;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;  // e.g. FakeTensorMode
  if (!raw_cpu(ref, dtype) || !ref.is_contiguous()) return false;
  for (const auto& t : same) {
    if (!raw_cpu(t, dtype) || !t.is_contiguous() || t.sizes() != ref.sizes()) return false;
  }
  for (const auto& t : scalars) {
    if (!raw_cpu(t, dtype) || t.dim() != 0) return false;
  }
  return true;
}

template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.const_data_ptr<T>());
  return out;
}

template <typename T>
std::vector<T> values(const std::vector<at::Tensor>& ts) {
  std::vector<T> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(*t.const_data_ptr<T>());  // a CPU read, no device sync
  return out;
}

using torch::autograd::SavedVariable;

// routes[i] for a state whose gradient goes straight to autograd
// (StackGradients.PLAIN in skip.py).
constexpr int64_t kPlain = -1;

// Pending history-gradient sums of one stack forward, per backward pass
// (graph task id) and per state index j; see StackGradients in skip.py.
struct StackSums {
  std::mutex mutex;
  std::unordered_map<int, std::unordered_map<int64_t, at::Tensor>> pending;
  // dL/dW of the stack's (L, H) weight table, per backward pass: each layer's
  // node adds its row here; the table's own node (TableBackward) takes it.
  std::unordered_map<int, at::Tensor> table_grads;
};

// The K weights of layer `row`, as 0-d views of the last K entries of its
// row in the (L, H) table: the window's slots are the last K (see
// window_weights in skip.py). Views below autograd (the node's edge is the
// table), except for create_graph, where they must carry the table's history.
std::vector<at::Tensor> table_row(const at::Tensor& table, int64_t row, size_t k, bool differentiable = false) {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  if (!differentiable) guard.emplace();
  const at::Tensor r = table.select(0, row);
  const int64_t h = table.size(1);
  std::vector<at::Tensor> w;
  w.reserve(k);
  for (size_t i = 0; i < k; ++i) w.push_back(r.select(0, h - static_cast<int64_t>(k) + static_cast<int64_t>(i)));
  return w;
}

struct MixBackward : public Node {
  std::vector<SavedVariable> weights;  // K 0-d weights, or empty with a table
  SavedVariable table;                 // the stack's (L, H) weights; row `layer` is this layer's
  bool tabled = false;
  std::vector<SavedVariable> states;
  std::shared_ptr<StackSums> stack;  // null for a standalone skip
  int64_t layer = 0;
  std::vector<int64_t> routes;

  std::string name() const override { return "MHCMixBackward"; }

  void release_variables() override {
    for (auto& w : weights) w.reset_data();
    table.reset_data();
    for (auto& h : states) h.reset_data();
  }

  // next edges: y, then w_1 .. w_K (or the table), then h_1 .. h_K
  variable_list apply(variable_list&& grads) override {
    const size_t k = states.size();
    const size_t nw = tabled ? 1 : k;  // weight edges
    variable_list out(1 + nw + k);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    if (task_should_compute_output(0)) out[0] = g;
    at::Tensor tab;
    std::vector<at::Tensor> w(k), h(k);
    std::vector<bool> want_dot(k);
    if (tabled) {
      tab = table.unpack();
      w = table_row(tab, layer, k, /*differentiable=*/at::GradMode::is_enabled());
    }
    for (size_t i = 0; i < k; ++i) {
      if (!tabled) w[i] = weights[i].unpack();
      h[i] = states[i].unpack();
      want_dot[i] = task_should_compute_output(tabled ? 1 : 1 + i);
    }
    // With create_graph (grad mode on) everything stays plain, differentiable
    // ATen ops: dL/dw_k = <h_k, g>, dL/dh_k = w_k g.
    if (at::GradMode::is_enabled()) {
      const at::Tensor flat = g.reshape(-1);
      std::vector<at::Tensor> dots;
      for (size_t i = 0; i < k; ++i) {
        if (want_dot[i]) dots.push_back(at::dot(h[i].reshape(-1), flat));
        if (task_should_compute_output(1 + nw + i)) out[1 + nw + i] = g * w[i];
      }
      if (!tabled) {
        for (size_t i = 0; i < dots.size(); ++i) out[1 + i] = dots[i];
      } else if (!dots.empty()) {  // row `layer`, last K slots, of a table-shaped gradient
        const int64_t rows = tab.size(0), cols = tab.size(1), kk = static_cast<int64_t>(k);
        out[1] = at::constant_pad_nd(at::stack(dots).unsqueeze(0), {cols - kk, 0, layer, rows - 1 - layer});
      }
      return out;
    }
    // Where each dL/dh_k goes: a fresh tensor (w_k g), or added into a
    // pending sum (StackGradients), which the last reader hands to autograd.
    std::vector<at::Tensor> dst(k);
    std::vector<bool> accumulate(k, false);
    std::unique_lock<std::mutex> lock;
    std::unordered_map<int64_t, at::Tensor>* pending = nullptr;
    int task = 0;
    if (stack) {
      lock = std::unique_lock<std::mutex>(stack->mutex);
      task = torch::autograd::get_current_graph_task_id();
      pending = &stack->pending[task];
    }
    for (size_t i = 0; i < k; ++i) {
      if (!task_should_compute_output(1 + nw + i)) continue;
      const int64_t j = stack ? routes[i] : kPlain;
      if (j == kPlain) {
        out[1 + nw + i] = dst[i] = at::empty_like(g, at::MemoryFormat::Contiguous);
        continue;
      }
      auto it = pending->find(j);
      if (it != pending->end()) {
        dst[i] = it->second;
        accumulate[i] = true;
        if (j == layer) pending->erase(it);  // the last reader of x_j hands over the sum
      } else {
        dst[i] = at::empty_like(g, at::MemoryFormat::Contiguous);
        if (j != layer) pending->emplace(j, dst[i]);
      }
      if (j == layer) out[1 + nw + i] = dst[i];
    }
    if (pending && pending->empty()) stack->pending.erase(task);
    // With a table, the dot products go into the stack's pending dL/dW (this
    // layer's row) rather than to autograd; the table's node hands it over.
    at::Tensor* table_grad = nullptr;
    if (tabled && want_dot[0]) {
      at::Tensor& acc = stack->table_grads[task];
      if (!acc.defined()) acc = at::zeros_like(tab, at::MemoryFormat::Contiguous);
      table_grad = &acc;
    }
    const int64_t first_slot = tabled ? tab.size(1) - static_cast<int64_t>(k) : 0;

    std::vector<at::Tensor> targets;
    for (const auto& d : dst) if (d.defined()) targets.push_back(d);
    if (fusable(g, h, w) && fusable(g, targets, {})) {
      AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mhc_mix_backward", [&] {
        std::vector<scalar_t*> out_ptrs(k, nullptr);
        for (size_t i = 0; i < k; ++i) if (dst[i].defined()) out_ptrs[i] = dst[i].data_ptr<scalar_t>();
        std::vector<scalar_t> dots;
        fused_mix_backward<scalar_t>(
            g.const_data_ptr<scalar_t>(), pointers<scalar_t>(h), values<scalar_t>(w), want_dot, out_ptrs,
            accumulate, dots, g.numel());
        if (table_grad) {  // the table has x's dtype here (fusable)
          scalar_t* row = table_grad->data_ptr<scalar_t>() + layer * table_grad->size(1) + first_slot;
          for (size_t i = 0; i < k; ++i) row[i] += dots[i];
        } else {
          for (size_t i = 0; i < k; ++i) {
            if (want_dot[i]) out[1 + i] = at::scalar_tensor(dots[i], g.options());
          }
        }
      });
      return out;
    }
    const at::Tensor flat = g.reshape(-1);
    std::vector<at::Tensor> table_dots;
    for (size_t i = 0; i < k; ++i) {
      if (want_dot[i]) {
        at::Tensor d = at::dot(h[i].reshape(-1), flat);
        if (table_grad) {
          table_dots.push_back(d);
        } else {
          out[1 + i] = d;
        }
      }
      if (!dst[i].defined()) continue;
      if (accumulate[i]) {
        dst[i].addcmul_(g, w[i]);
      } else {
        at::mul_out(dst[i], g, w[i]);
      }
    }
    if (table_grad) {  // no host read: stays on the device
      table_grad->select(0, layer).narrow(0, first_slot, static_cast<int64_t>(k)).add_(at::stack(table_dots));
    }
    return out;
  }
};

// The kernel's nodes have no forward-mode AD rule: refuse a tangent rather than drop it.
void check_no_forward_grad(const at::Tensor& t) {
  TORCH_CHECK(
      !t._fw_grad(/*level=*/0).defined(),
      "mhc_torch's C++ mixing kernel has no forward-mode AD rule; use reverse mode (backward / torch.autograd.grad)");
}

at::Tensor mix(
    const at::Tensor& y,
    const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& states,
    const std::shared_ptr<StackSums>& stack,
    int64_t layer,
    const std::vector<int64_t>& routes,
    const std::optional<at::Tensor>& table) {
  const size_t k = states.size();
  const bool tabled = table.has_value();
  TORCH_CHECK(k >= 1, "mix: need K >= 1 states");
  TORCH_CHECK(!stack || routes.size() == k, "mix: need one route per state");
  if (tabled) {
    TORCH_CHECK(weights.empty() && stack, "mix: a weight table comes instead of weights, and with a stack");
    TORCH_CHECK(
        table->dim() == 2 && 0 <= layer && layer < table->size(0) && static_cast<int64_t>(k) <= table->size(1),
        "mix: the weight table must be (L, H) with a row for this layer and H >= K");
  } else {
    TORCH_CHECK(weights.size() == k, "mix: need K weights");
  }
  const std::vector<at::Tensor> w = tabled ? table_row(*table, layer, k) : weights;
  bool needs_grad = false;
  auto check = [&](const at::Tensor& t) {
    check_no_forward_grad(t);
    needs_grad = needs_grad || t.requires_grad();
  };
  check(y);
  if (tabled) check(*table);
  for (const auto& t : weights) check(t);
  for (const auto& t : states) check(t);
  needs_grad = needs_grad && at::GradMode::is_enabled();

  at::Tensor out;
  if (fusable(y, states, w)) {
    out = at::empty_like(y, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mhc_mix", [&] {
      fused_mix<scalar_t>(
          out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), pointers<scalar_t>(states), values<scalar_t>(w),
          y.numel());
    });
  } else {
    // Plain arithmetic below the autograd layer; the node is attached by hand.
    at::AutoDispatchBelowADInplaceOrView guard;
    out = at::addcmul(y, states[0], w[0]);
    for (size_t i = 1; i < k; ++i) out.addcmul_(states[i], w[i]);
  }
  if (!needs_grad) return out;

  auto node = c10::make_intrusive<MixBackward>();
  torch::autograd::edge_list edges;
  edges.reserve(1 + 2 * k);
  edges.push_back(torch::autograd::impl::gradient_edge(y));
  if (tabled) edges.push_back(torch::autograd::impl::gradient_edge(*table));
  for (const auto& t : weights) edges.push_back(torch::autograd::impl::gradient_edge(t));
  for (const auto& t : states) edges.push_back(torch::autograd::impl::gradient_edge(t));
  node->set_next_edges(std::move(edges));
  node->weights.reserve(k);
  node->states.reserve(k);
  for (const auto& t : weights) node->weights.emplace_back(t, /*is_output=*/false);
  if (tabled) {
    node->table = SavedVariable(*table, /*is_output=*/false);
    node->tabled = true;
  }
  for (const auto& t : states) node->states.emplace_back(t, /*is_output=*/false);
  node->stack = stack;
  node->layer = layer;
  node->routes = routes;
  torch::autograd::set_history(out, node);
  return out;
}

// ---------------------------------------------------------------------------
// The stack's (L, H) weight table and its node.
//
// Every layer's mix reads its row of one table, so the weights need no
// unbind into L*H 0-d tensors, and their gradient no L*H 0-d tensors either:
// each layer's node adds its K dot products into the stack's pending dL/dW
// (StackSums::table_grads) and the table's node, TableBackward, which
// autograd runs only after every node with an edge to the table, takes the
// finished sum. The table is either projected here from the logits
// (`project`: mode hc/mhc, constraint simplex/identity, float32 on the CPU;
// the same arithmetic as window_weights in skip.py, in a loop over L*H floats
// rather than ~35 small ATen ops each way) or projected in Python and passed
// through (`collect`: every other option and device).

// One row: the weights of a window of the last K of H slots (the first H-K
// are 0), and the base projection before the identity floor.
void project_row(const float* mu, int64_t h, int64_t k, bool simplex, bool identity, float eps, float tau,
                 float* w, float* base) {
  const int64_t lo = h - k;
  for (int64_t i = 0; i < lo; ++i) w[i] = base[i] = 0.0f;
  float z[64], u[64];
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < k; ++i) top = std::max(top, z[i] = mu[lo + i] / tau);
  if (simplex) {
    // Sort and threshold, as _simplex_threshold (projections.py):
    // rho = #{j : 1/j + u_j - c_j / j > 0}, alpha = relu(1/rho + z - c_rho / rho).
    for (int64_t i = 0; i < k; ++i) u[i] = z[i] = z[i] - top;
    std::sort(u, u + k, std::greater<float>());
    float c = 0.0f, theta = 0.0f;
    int64_t rho = 0;
    for (int64_t j = 1; j <= k; ++j) {
      c += u[j - 1];
      const float fj = static_cast<float>(j);
      if (1.0f / fj + (u[j - 1] - c / fj) > 0.0f) {
        rho = j;
        theta = c;
      }
    }
    const float r = static_cast<float>(rho);
    for (int64_t i = 0; i < k; ++i) base[lo + i] = std::max(0.0f, 1.0f / r + (z[i] - theta / r));
  } else {
    float sum = 0.0f;
    for (int64_t i = 0; i < k; ++i) sum += (u[i] = std::exp(z[i] - top));
    for (int64_t i = 0; i < k; ++i) base[lo + i] = u[i] / sum;
  }
  const float scale = identity ? 1.0f - eps : 1.0f;
  for (int64_t i = lo; i < h; ++i) w[i] = identity ? scale * base[i] : base[i];
  if (identity) w[h - 1] += eps;
}

struct TableBackward : public Node {
  std::shared_ptr<StackSums> stack;
  bool projected = false;  // else the table came through `collect` and its gradient goes straight on
  bool simplex = true, identity = false;
  double epsilon = 0.0, temperature = 1.0;
  int64_t first = 1;
  at::Tensor base;         // (L, H) base projection, no history: the support for simplex, alpha for softmax
  SavedVariable output;    // the table, for a differentiable softmax backward (create_graph)

  std::string name() const override { return "MHCWeightTableBackward"; }

  void release_variables() override {
    base.reset();
    output.reset_data();
  }

  // next edges: the L layers' logits (projected), or the Python-projected table
  variable_list apply(variable_list&& grads) override {
    at::Tensor g = grads[0];
    {
      std::lock_guard<std::mutex> lock(stack->mutex);
      auto it = stack->table_grads.find(torch::autograd::get_current_graph_task_id());
      if (it != stack->table_grads.end()) {
        g = g.defined() ? g + it->second : it->second;
        stack->table_grads.erase(it);
      }
    }
    variable_list out(num_outputs());
    if (!g.defined()) return out;
    if (!projected) {
      out[0] = g;
      return out;
    }
    TORCH_CHECK(base.defined(), "MHCWeightTableBackward: the graph was freed (use retain_graph=True)");
    const int64_t rows = base.size(0), h = base.size(1);
    const float scale = identity ? static_cast<float>(1.0 - epsilon) : 1.0f;
    const float tau = static_cast<float>(temperature);
    if (at::GradMode::is_enabled()) {
      // create_graph: the same vector-Jacobian products in differentiable ATen
      // ops. softmax needs alpha as a function of the logits: the saved table
      // (whose history is this node) with the identity floor taken off.
      const at::Tensor v = g.to(at::kFloat) * scale;
      at::Tensor dz;
      if (simplex) {  // (diag(s) - s s^T / |s|) v, s the support: piecewise constant in mu
        const at::Tensor s = (base > 0).to(at::kFloat);
        dz = s * (v - (s * v).sum(-1, true) / s.sum(-1, true));
      } else {  // (diag(a) - a a^T) v
        at::Tensor a = output.unpack(getptr());
        if (identity) {
          const at::Tensor last = at::zeros({h}, a.options()).index_fill_(0, at::tensor({h - 1}), epsilon);
          a = (a - last) / scale;
        }
        dz = a * (v - (a * v).sum(-1, true));
      }
      const auto per_layer = (dz / tau).unbind(0);
      for (int64_t l = 0; l < rows; ++l) {
        if (task_should_compute_output(l)) out[l] = per_layer[l];
      }
      return out;
    }
    const at::Tensor gf = g.to(at::kFloat).contiguous();
    const float* gp = gf.const_data_ptr<float>();
    const float* bp = base.const_data_ptr<float>();
    for (int64_t l = 0; l < rows; ++l) {
      if (!task_should_compute_output(l)) continue;
      const int64_t lo = h - std::min(first + l, h);
      const float* v = gp + l * h;
      const float* a = bp + l * h;
      at::Tensor d = at::zeros({h}, gf.options());
      float* dp = d.data_ptr<float>();
      if (simplex) {
        float sv = 0.0f, n = 0.0f;
        for (int64_t i = lo; i < h; ++i) {
          if (a[i] > 0.0f) {
            sv += scale * v[i];
            n += 1.0f;
          }
        }
        const float mean = sv / n;
        for (int64_t i = lo; i < h; ++i) dp[i] = a[i] > 0.0f ? (scale * v[i] - mean) / tau : 0.0f;
      } else {
        // a_i (v_i - sum_j a_j v_j), with v shifted by its value c at the
        // largest a (exact, as sum_j a_j = 1): near a one-hot a, which the
        // identity init gives, the unshifted form cancels to rounding noise.
        int64_t top = lo;
        for (int64_t i = lo; i < h; ++i) top = a[i] > a[top] ? i : top;
        const float c = v[top];
        float av = 0.0f;
        for (int64_t i = lo; i < h; ++i) av += a[i] * (v[i] - c);
        for (int64_t i = lo; i < h; ++i) dp[i] = a[i] * (scale * ((v[i] - c) - av)) / tau;
      }
      out[l] = d;
    }
    return out;
  }
};

at::Tensor project(
    const std::vector<at::Tensor>& logits,
    int64_t first,
    bool simplex,
    bool identity,
    double epsilon,
    double temperature,
    const std::shared_ptr<StackSums>& stack) {
  TORCH_CHECK(!logits.empty() && stack && first >= 1, "project: need L >= 1 logits, a stack and K_0 >= 1");
  const int64_t rows = static_cast<int64_t>(logits.size()), h = logits[0].numel();
  TORCH_CHECK(h >= 1 && h <= 64, "project: need 1 <= H <= 64");
  bool needs_grad = false;
  for (const auto& t : logits) {
    TORCH_CHECK(
        raw_cpu(t, at::kFloat) && t.dim() == 1 && t.numel() == h && t.is_contiguous(),
        "project: every logits tensor must be a contiguous float32 CPU vector of length H");
    check_no_forward_grad(t);
    needs_grad = needs_grad || t.requires_grad();
  }
  at::Tensor table = at::empty({rows, h}, at::kFloat);
  at::Tensor base = at::empty({rows, h}, at::kFloat);
  for (int64_t l = 0; l < rows; ++l) {
    project_row(logits[l].const_data_ptr<float>(), h, std::min(first + l, h), simplex, identity,
                static_cast<float>(epsilon), static_cast<float>(temperature), table.data_ptr<float>() + l * h,
                base.data_ptr<float>() + l * h);
  }
  if (!(needs_grad && at::GradMode::is_enabled())) return table;
  auto node = c10::make_intrusive<TableBackward>();
  torch::autograd::edge_list edges;
  edges.reserve(rows);
  for (const auto& t : logits) edges.push_back(torch::autograd::impl::gradient_edge(t));
  node->set_next_edges(std::move(edges));
  node->stack = stack;
  node->projected = true;
  node->simplex = simplex;
  node->identity = identity;
  node->epsilon = epsilon;
  node->temperature = temperature;
  node->first = first;
  node->base = base;
  torch::autograd::set_history(table, node);
  node->output = SavedVariable(table, /*is_output=*/true);
  return table;
}

at::Tensor collect(const at::Tensor& table, const std::shared_ptr<StackSums>& stack) {
  TORCH_CHECK(stack && table.dim() == 2, "collect: need an (L, H) table and a stack");
  check_no_forward_grad(table);
  if (!(table.requires_grad() && at::GradMode::is_enabled())) return table;
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = table.clone(at::MemoryFormat::Contiguous);
  }
  auto node = c10::make_intrusive<TableBackward>();
  node->set_next_edges({torch::autograd::impl::gradient_edge(table)});
  node->stack = stack;
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mhc_torch's mixing kernel (see mhc_torch/_native.py)";
  py::class_<StackSums, std::shared_ptr<StackSums>>(m, "StackSums")
      .def(py::init<>());
  m.def("mix", &mix, py::arg("y"), py::arg("weights"), py::arg("states"), py::arg("stack").none(true),
        py::arg("layer"), py::arg("routes"), py::arg("table") = py::none());
  m.def("project", &project, py::arg("logits"), py::arg("first"), py::arg("simplex"), py::arg("identity"),
        py::arg("epsilon"), py::arg("temperature"), py::arg("stack"));
  m.def("collect", &collect, py::arg("table"), py::arg("stack"));
  // For side-by-side measurements (benchmarks/bench_stack.py) and tests.
  m.def("_fused_loops", []() { return g_fused_loops; });
  m.def("_set_fused_loops", [](bool on) { g_fused_loops = on; });
}
