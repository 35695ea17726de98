// The Python module mmdynconv.ops._cpu (entry points: cpu_ops.h).
#include "cpu_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmdynconv's compiled CPU ops: the AIK convolution and its attention generator";
  m.def("aik_forward", &aik_forward, "AIK convolution forward (groups == 1)");
  m.def("aik_backward", &aik_backward, "AIK convolution backward (groups == 1)");
  m.def("depthwise_context_forward", &depthwise_context_forward,
        "the generator's depthwise conv, its batch statistics and the pooled mean");
  m.def("depthwise_context_backward", &depthwise_context_backward,
        "gradients of x and of the depthwise weight from the local maps' gradient");
  m.def("generator_forward", &generator_forward, "the attention generator's forward");
  m.def("generator_backward", &generator_backward, "the attention generator's backward");
}
