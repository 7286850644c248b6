#!/usr/bin/env python3
"""`make demo`: quantization-aware training on real data (scikit-learn's bundled digits).

Trains a small CNN in fp32, then for each quantization config reports the test accuracy
without QAT (fp32 weights under the quantized numerics) and after a few epochs of QAT,
runs the QAT-trained int8 CNN through TorchScript, and writes a table, a plot and
results.json under build/demo/. The code lives in `qwix_torch.demo`
(`python -m qwix_torch.demo` runs the same thing); see `--help` for the options.
"""
import os
import sys

try:
    from qwix_torch.demo import main
except ImportError:  # not installed: use the in-tree package (the extension is built in place)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from qwix_torch.demo import main

if __name__ == "__main__":
    sys.exit(main())
