"""edge-compress: turn one ONNX model into a measured ladder of lighter variants."""
