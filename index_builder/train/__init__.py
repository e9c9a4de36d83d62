"""The train stage: a sample drawn across the parts, and the quantizer trained on it once."""
