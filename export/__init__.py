"""molmocap export: a Molmo2 checkpoint to ONNX components and a manifest (needs torch and transformers)."""
