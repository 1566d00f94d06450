"""sttp-compress: post-training compression of PyTorch models with the Spectral Tensor Train
Parameterization (Obukhov et al., AISTATS 2021)."""

from .convert import compress, compress_module, compressed_layers, count_parameters, decompress
from .layers import SpectralTT
from .serve import freeze, frozen, unfreeze

__version__ = "0.1.0"
__all__ = ["compress", "compress_module", "compressed_layers", "count_parameters", "decompress",
           "freeze", "frozen", "unfreeze", "SpectralTT", "__version__"]
