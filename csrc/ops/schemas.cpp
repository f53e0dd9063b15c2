// The one place every slimtune op's schema is declared. Kernels register per dispatch
// key in their own files; fake kernels and autograd live in python/slimtune/ops.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(slimtune, m) {
  m.set_python_module("slimtune.ops");

  // LoRA: y = x W^T (+ bias) + scale * (dropout(x) A^T) B^T with a Philox mask regenerated
  // from (seed, offset); also returns xa = scale * dropout(x) A^T (T x r), kept for backward.
  m.def("lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout, int seed, int offset) -> (Tensor, Tensor)");
  m.def("lora_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor xa, "
        "float scale, float dropout, int seed, int offset, bool need_x, bool need_A, bool need_B, bool need_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Several projections of one x (Q/K/V): x read once for all adapters, one dropout mask.
  // An empty (0-element) entry of `biases` means no bias for that projection.
  m.def("lora_linear_multi(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] lora_As, Tensor[] lora_Bs, "
        "float[] scales, float dropout, int seed, int offset) -> (Tensor[], Tensor)");
  m.def("lora_linear_multi_backward(Tensor[] grad_outs, Tensor x, Tensor[] weights, Tensor[] lora_As, "
        "Tensor[] lora_Bs, Tensor xa, float[] scales, float dropout, int seed, int offset, bool need_x, bool need_A, "
        "bool need_B, bool[] need_bias) -> (Tensor, Tensor[], Tensor[], Tensor[])");
  // The keep mask (bool, shape of `like`) lora_linear uses; for tests and inspection only.
  m.def("lora_dropout_mask(Tensor like, float p, int seed, int offset) -> Tensor");
}
