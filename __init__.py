"""molmocap: offline image captioning and visual question answering with Molmo2 on ONNX Runtime.

The public API is `from molmocap import Captioner, Request`. The pipeline lives in `molmocap.runtime` (numpy, Pillow,
onnxruntime and tokenizers only), the exporter in `molmocap.export`, the HTTP API in `molmocap.serve` and the
command line in `molmocap.cli`.
"""

from importlib import metadata

from .runtime import Answer, Captioner, Request, Result
from .runtime.captioner import EncodedImage
from .runtime.errors import ExportError, InputError, ModelError, MolmocapError

try:
    __version__ = metadata.version("molmocap")
except metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["Answer", "Captioner", "EncodedImage", "Request", "Result", "MolmocapError", "InputError", "ModelError",
           "ExportError"]
