"""The wquant pass: Weight-only low-bit quantization (4 and 8 bits)."""
