"""sttp-compress: post-training compression of PyTorch models with the Spectral Tensor Train
Parameterization (Obukhov et al., AISTATS 2021).

    import sttp_compress as sc
    sc.compress_(model, sc.CompressConfig(ratio=10))       # in place; docs/python-api.md
    sc.finetune(model, teacher, train_loader, sc.FinetuneConfig(epochs=10), val_loader=val_loader)
    sc.save(model, "model.sttp.safetensors", arch="torchvision:resnet18?num_classes=10")
    model = sc.load("model.sttp.safetensors")
    sc.export(model, "model.onnx", example_inputs)          # runs in onnxruntime without this package
"""

__version__ = "0.1.0"

from sttp_compress.api import CompressConfig, FinetuneConfig, compress_, export, finetune, load, save  # noqa: E402
from sttp_compress.compress.batchnorm import fold_batchnorm_  # noqa: E402
from sttp_compress.compress.convert import (compress, compress_module, compressed_layers,  # noqa: E402
                                            count_parameters, decompress)
from sttp_compress.compress.serve import freeze, frozen, unfreeze  # noqa: E402
from sttp_compress.core.spectral_tt import SpectralTT  # noqa: E402
from sttp_compress.errors import UserError  # noqa: E402

__all__ = ["compress_", "CompressConfig", "finetune", "FinetuneConfig", "save", "load", "export", "UserError",
           "compress", "compress_module", "fold_batchnorm_", "compressed_layers", "count_parameters", "decompress",
           "freeze", "frozen", "unfreeze", "SpectralTT", "__version__"]
