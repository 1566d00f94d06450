"""sttp-compress: post-training compression of PyTorch models with the Spectral Tensor Train
Parameterization (Obukhov et al., AISTATS 2021)."""

from sttp_compress.compress.convert import compress, compress_module, compressed_layers, count_parameters, decompress
from sttp_compress.core.spectral_tt import SpectralTT
from sttp_compress.compress.serve import freeze, frozen, unfreeze

__version__ = "0.1.0"
__all__ = ["compress", "compress_module", "compressed_layers", "count_parameters", "decompress",
           "freeze", "frozen", "unfreeze", "SpectralTT", "__version__"]
