"""QuantizationJob API: typed models, capability matrix, runner contract."""
