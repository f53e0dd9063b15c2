// The one place every slimtune op's schema is declared. Kernels register per dispatch
// key in their own files; fake kernels and autograd live in python/slimtune/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(slimtune, m) {
  m.set_python_module("slimtune.ops");

  // weight.view(-1)[indices] += alpha * values, in place.
  m.def("sparse_delta_merge_(Tensor(a!) weight, Tensor indices, Tensor values, float alpha) -> ()");

  // memsave: bit-packed ReLU mask (1 bit per element) and the backward that reads it.
  m.def("memsave_relu(Tensor x) -> (Tensor out, Tensor mask)");
  m.def("memsave_relu_mask(Tensor x) -> Tensor");
  m.def("memsave_relu_backward(Tensor grad, Tensor mask) -> Tensor");
  // memsave: max-pool argmax as an int8 offset inside its window, and the backward from it.
  m.def("memsave_maxpool_compact(Tensor indices, int[] input_size, int[] kernel_size, int[] stride, int[] padding, "
        "int[] dilation) -> Tensor");
  m.def("memsave_maxpool_backward(Tensor grad, Tensor offsets, int[] input_size, int[] kernel_size, int[] stride, "
        "int[] padding, int[] dilation) -> Tensor");
}
