"""Target profiles (memory budget, formats, quantization, gate thresholds) and device runners."""
