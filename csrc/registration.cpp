// The curvkern operator library: schemas and their CPU kernels.
// Fake (meta) implementations are registered in Python next to each op's wrapper
// (curvkern/bandwidth.py, curvkern/optim/<family>/cpp.py, curvkern/ce/cpp.py, curvkern/linear_ce/cpp.py), so
// torch.compile can trace every op.
#include <Python.h>
#include <torch/library.h>

#include "bandwidth.h"
#include "ce/cross_entropy.h"
#include "cpu_dispatch.h"
#include "linear_ce/linear_cross_entropy.h"
#include "optim/biostatis.h"
#include "optim/hysterograd.h"

// A real Python module, so `import curvkern._C` loads this library and runs TORCH_LIBRARY.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(curvkern, m) {
  // No tensor arguments, so no dispatch key: registered with their (catch-all) kernels.
  m.def("cpu_capability() -> str", &curvkern::cpu_capability);
  m.def("cpu_capabilities() -> str[]", &curvkern::cpu_capabilities);
  m.def("stream_axpy_(Tensor(a!) a, Tensor b, float scalar) -> ()");
  m.def(
      "hysterograd_pass_a_(Tensor[] grads, Tensor(a!)[] metrics, Tensor(b!) accumulator, float beta, "
      "float epsilon, float metric_scale) -> ()");
  m.def(
      "hysterograd_scalars_(Tensor accumulator, Tensor(a!) tau, Tensor(b!) temp, Tensor(c!) energy, Tensor lr, "
      "float stiffening_factor, float beta, float cooling_rate, bool adaptive_threshold, float? grad_clip, "
      "float hysteresis_scale) -> (Tensor, Tensor)");
  m.def(
      "hysterograd_pass_b_(Tensor(a!)[] params, Tensor[] grads, Tensor[] metrics, Tensor stats, "
      "Tensor neg_step_size, float epsilon) -> ()");
  m.def("biostatis_sums(Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, float beta1, float beta2) -> Tensor");
  m.def(
      "biostatis_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] memory_emas, Tensor(e!)[] steps, Tensor sums, Tensor group_sums, Tensor lr, float beta1, "
      "float beta2, float eps, float weight_decay, float homeo_rate, float coherence_target, float energy_target, "
      "float lambda_energy, float[] memory_decays, float[] memory_weights, float flip_threshold, "
      "float ascent_strength) -> Tensor");
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, int ignore_index, float label_smoothing, "
      "float z_loss=0., float softcap=0., Tensor? weight=None) -> (Tensor, Tensor)");
  m.def(
      "cross_entropy_backward(Tensor logits, Tensor target, Tensor lse, Tensor grad_scale, int ignore_index, "
      "float label_smoothing, float z_loss=0., float softcap=0., Tensor? weight=None) -> Tensor");
  m.def(
      "cross_entropy_hvp_(Tensor logits, Tensor target, Tensor u, Tensor scale, int ignore_index, "
      "float label_smoothing, int shift_period, bool stream_out, Tensor(a!) out, float z_loss=0., "
      "float softcap=0., Tensor? weight=None) -> Tensor");
  m.def(
      "cross_entropy_partial_stats(Tensor logits, Tensor target, Tensor? u, int ignore_index, float label_smoothing, "
      "int class_offset, int num_classes) -> Tensor");
  m.def(
      "cross_entropy_shard_backward(Tensor logits, Tensor target, Tensor lse, Tensor grad_scale, int ignore_index, "
      "float label_smoothing, int class_offset, int num_classes) -> Tensor");
  m.def(
      "cross_entropy_shard_hvp_(Tensor logits, Tensor target, Tensor u, Tensor lse, Tensor p_dot_u, Tensor scale, "
      "int ignore_index, int num_classes, Tensor(a!) out) -> ()");
  m.def(
      "linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "float label_smoothing, int n_tile, int v_tile, float z_loss=0., float softcap=0., Tensor? class_weight=None) "
      "-> (Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor grad_scale, int ignore_index, float label_smoothing, int n_tile, int v_tile, float z_loss=0., "
      "float softcap=0., Tensor? class_weight=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_cross_entropy_hvp(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor lse, "
      "Tensor grad_scale, Tensor? v_hidden, Tensor? v_weight, Tensor? v_bias, int ignore_index, "
      "float label_smoothing, int n_tile, int v_tile, float z_loss=0., float softcap=0., Tensor? class_weight=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_ce_ggn_vp(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor scale, Tensor d_hidden, "
      "Tensor? d_weight, Tensor? d_bias, int ignore_index, int n_tile, int v_tile, float label_smoothing=0., "
      "float z_loss=0., float softcap=0., Tensor? class_weight=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(curvkern, CPU, m) {
  m.impl("stream_axpy_", &curvkern::stream_axpy_);
  m.impl("hysterograd_pass_a_", &curvkern::hysterograd_pass_a_);
  m.impl("hysterograd_scalars_", &curvkern::hysterograd_scalars_);
  m.impl("hysterograd_pass_b_", &curvkern::hysterograd_pass_b_);
  m.impl("biostatis_sums", &curvkern::biostatis_sums);
  m.impl("biostatis_update_", &curvkern::biostatis_update_);
  m.impl("cross_entropy_forward", &curvkern::cross_entropy_forward);
  m.impl("cross_entropy_backward", &curvkern::cross_entropy_backward);
  m.impl("cross_entropy_hvp_", &curvkern::cross_entropy_hvp_);
  m.impl("cross_entropy_partial_stats", &curvkern::cross_entropy_partial_stats);
  m.impl("cross_entropy_shard_backward", &curvkern::cross_entropy_shard_backward);
  m.impl("cross_entropy_shard_hvp_", &curvkern::cross_entropy_shard_hvp_);
  m.impl("linear_cross_entropy_forward", &curvkern::linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &curvkern::linear_cross_entropy_backward);
  m.impl("linear_cross_entropy_hvp", &curvkern::linear_cross_entropy_hvp);
  m.impl("linear_ce_ggn_vp", &curvkern::linear_ce_ggn_vp);
}
