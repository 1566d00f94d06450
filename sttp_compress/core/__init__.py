"""The method on tensors: Householder frames, tensor-train maths, the STTP parametrization, inference forms."""
