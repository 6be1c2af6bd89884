// Pieces shared by the ops of the CPU extension (lowrank_rows.cpp, red.cpp).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <optional>
#include <string>
#include <vector>

namespace reft_cpu {

inline at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

inline bool wants_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

inline std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// For a backward run with create_graph=True: its gradients are right but carry no second-order
// terms, so each defined one in `out` gets a node that raises if it is differentiated again (the
// Python Functions do the same through ops/_autograd.py's once_differentiable, with this
// message). The node also takes a zero-size tensor that depends on every input of the backward
// that requires grad (the incoming gradient `g`, the saved tensors), so that a later
// differentiation towards those inputs reaches it and raises instead of calling them unused.
inline void refuse_double_backward(std::vector<at::Tensor>& out, const at::Tensor& g,
                                   const std::vector<at::Tensor>& saved, const char* op_name) {
  if (!at::GradMode::is_enabled()) return;
  std::vector<at::Tensor> anchors;
  auto link = [&](const at::Tensor& t) {
    if (t.defined() && t.requires_grad()) anchors.push_back(t.reshape(-1).narrow(0, 0, 0).sum().reshape(1));
  };
  link(g);
  for (const auto& t : saved) link(t);
  if (anchors.empty()) return;
  std::vector<at::Tensor> inputs;
  std::vector<size_t> where;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].defined()) {
      inputs.push_back(out[i].detach());
      where.push_back(i);
    }
  }
  inputs.push_back(at::cat(anchors).narrow(0, 0, 0));
  const std::string msg = std::string(op_name) +
                          " does not support double backward: its gradient was computed with "
                          "create_graph=True and is being differentiated again";
  auto wrapped = torch::autograd::DelayedError(msg, static_cast<int64_t>(inputs.size())).apply(std::move(inputs));
  for (size_t k = 0; k < where.size(); ++k) out[where[k]] = wrapped[k];
}

}  // namespace reft_cpu
