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

#include <memory>
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
};

struct MixBackward : public Node {
  std::vector<SavedVariable> weights;
  std::vector<SavedVariable> states;
  std::shared_ptr<StackSums> stack;  // null for a standalone skip
  int64_t layer = 0;
  std::vector<int64_t> routes;

  std::string name() const override { return "MHCMixBackward"; }

  void release_variables() override {
    for (auto& w : weights) w.reset_data();
    for (auto& h : states) h.reset_data();
  }

  // next edges: y, w_1 .. w_K, h_1 .. h_K
  variable_list apply(variable_list&& grads) override {
    const size_t k = weights.size();
    variable_list out(1 + 2 * k);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    if (task_should_compute_output(0)) out[0] = g;
    std::vector<at::Tensor> w(k), h(k);
    std::vector<bool> want_dot(k);
    for (size_t i = 0; i < k; ++i) {
      w[i] = weights[i].unpack();
      h[i] = states[i].unpack();
      want_dot[i] = task_should_compute_output(1 + i);
    }
    // With create_graph (grad mode on) everything stays plain, differentiable
    // ATen ops: dL/dw_k = <h_k, g>, dL/dh_k = w_k g.
    if (at::GradMode::is_enabled()) {
      const at::Tensor flat = g.reshape(-1);
      for (size_t i = 0; i < k; ++i) {
        if (want_dot[i]) out[1 + i] = at::dot(h[i].reshape(-1), flat);
        if (task_should_compute_output(1 + k + i)) out[1 + k + i] = g * w[i];
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
      if (!task_should_compute_output(1 + k + i)) continue;
      const int64_t j = stack ? routes[i] : kPlain;
      if (j == kPlain) {
        out[1 + k + i] = dst[i] = at::empty_like(g, at::MemoryFormat::Contiguous);
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
      if (j == layer) out[1 + k + i] = dst[i];
    }
    if (pending && pending->empty()) stack->pending.erase(task);

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
        for (size_t i = 0; i < k; ++i) {
          if (want_dot[i]) out[1 + i] = at::scalar_tensor(dots[i], g.options());
        }
      });
      return out;
    }
    const at::Tensor flat = g.reshape(-1);
    for (size_t i = 0; i < k; ++i) {
      if (want_dot[i]) out[1 + i] = at::dot(h[i].reshape(-1), flat);
      if (!dst[i].defined()) continue;
      if (accumulate[i]) {
        dst[i].addcmul_(g, w[i]);
      } else {
        at::mul_out(dst[i], g, w[i]);
      }
    }
    return out;
  }
};

at::Tensor mix(
    const at::Tensor& y,
    const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& states,
    const std::shared_ptr<StackSums>& stack,
    int64_t layer,
    const std::vector<int64_t>& routes) {
  const size_t k = states.size();
  TORCH_CHECK(k >= 1 && weights.size() == k, "mix: need K >= 1 states and K weights");
  TORCH_CHECK(!stack || routes.size() == k, "mix: need one route per state");
  bool needs_grad = false;
  auto check = [&](const at::Tensor& t) {
    TORCH_CHECK(
        !t._fw_grad(/*level=*/0).defined(),
        "MHCSkip's mix has no forward-mode AD rule; use reverse mode (backward / torch.autograd.grad)");
    needs_grad = needs_grad || t.requires_grad();
  };
  check(y);
  for (const auto& t : weights) check(t);
  for (const auto& t : states) check(t);
  needs_grad = needs_grad && at::GradMode::is_enabled();

  at::Tensor out;
  if (fusable(y, states, weights)) {
    out = at::empty_like(y, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "mhc_mix", [&] {
      fused_mix<scalar_t>(
          out.data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), pointers<scalar_t>(states),
          values<scalar_t>(weights), y.numel());
    });
  } else {
    // Plain arithmetic below the autograd layer; the node is attached by hand.
    at::AutoDispatchBelowADInplaceOrView guard;
    out = at::addcmul(y, states[0], weights[0]);
    for (size_t i = 1; i < k; ++i) out.addcmul_(states[i], weights[i]);
  }
  if (!needs_grad) return out;

  auto node = c10::make_intrusive<MixBackward>();
  torch::autograd::edge_list edges;
  edges.reserve(1 + 2 * k);
  edges.push_back(torch::autograd::impl::gradient_edge(y));
  for (const auto& t : weights) edges.push_back(torch::autograd::impl::gradient_edge(t));
  for (const auto& t : states) edges.push_back(torch::autograd::impl::gradient_edge(t));
  node->set_next_edges(std::move(edges));
  node->weights.reserve(k);
  node->states.reserve(k);
  for (const auto& t : weights) node->weights.emplace_back(t, /*is_output=*/false);
  for (const auto& t : states) node->states.emplace_back(t, /*is_output=*/false);
  node->stack = stack;
  node->layer = layer;
  node->routes = routes;
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mhc_torch's mixing kernel (see mhc_torch/_native.py)";
  py::class_<StackSums, std::shared_ptr<StackSums>>(m, "StackSums")
      .def(py::init<>());
  m.def("mix", &mix, py::arg("y"), py::arg("weights"), py::arg("states"), py::arg("stack").none(true),
        py::arg("layer"), py::arg("routes"));
  // For side-by-side measurements (benchmarks/bench_stack.py) and tests.
  m.def("_fused_loops", []() { return g_fused_loops; });
  m.def("_set_fused_loops", [](bool on) { g_fused_loops = on; });
}
