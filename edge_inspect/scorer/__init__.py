"""The scorer: backbone, scorer parameters, memory bank, ONNX scorer graph, threshold, calibration,
synthetic defects and the product loader; `backends/` runs the graph (ONNX Runtime, TensorRT)."""
