"""molmocap runtime: Molmo2 captioning on ONNX Runtime with numpy, Pillow and tokenizers only."""

from .captioner import Captioner, Result
from .errors import ExportError, InputError, ModelError, MolmocapError
from .request import Answer, Request

__all__ = ["Answer", "Captioner", "Request", "Result", "MolmocapError", "InputError", "ModelError", "ExportError"]
