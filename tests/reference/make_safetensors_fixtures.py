#!/usr/bin/env python3
"""Write tests/fixtures/safetensors/python_dtypes.safetensors with the Python `safetensors`
library (torch backend, so BF16 is available).

Every value comes from a formula that tests/test_safetensors.c evaluates again in C, so the
test compares the reader against an independent computation, not against copied outputs.
Keep the formulas here and in the C test in sync.

Run from the repository root:  python3 tests/reference/make_safetensors_fixtures.py
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file

OUT = os.path.join("tests", "fixtures", "safetensors", "python_dtypes.safetensors")

# Every 7th 16-bit pattern: 9363 values covering zeros, subnormals, normals, inf and NaN of
# both signs (7 is odd, so all low-bit residues and both sign halves are reached).
PATTERN_STEP = 7


def f32_value(i):
    """C: (float)((i - 50) * 1.7 + i * i * 0.013), all in double then rounded to float."""
    return (i - 50) * 1.7 + i * i * 0.013


def f64_value(i):
    """C: (i - 3) * 1e10 / 7.0 + 0.1 * i (double)."""
    return (i - 3) * 1e10 / 7.0 + 0.1 * i


def i64_value(i):
    """C: (i % 2 ? -1 : 1) * (int64_t)i * 123456789013."""
    return (-1 if i % 2 else 1) * i * 123456789013


def small_int_value(i, lo, hi):
    """C (int64): lo + (hi - lo) * i / 5 for i = 0..5: both ends of the type's range."""
    return lo + (hi - lo) * i // 5


def main():
    patterns = np.arange(0, 65536, PATTERN_STEP, dtype=np.int64)
    as_int16 = torch.from_numpy(patterns.astype(np.uint16).view(np.int16).copy())
    tensors = {
        "f32": torch.tensor([f32_value(i) for i in range(60)], dtype=torch.float64)
        .to(torch.float32)
        .reshape(3, 4, 5),
        "f64": torch.tensor([f64_value(i) for i in range(7)], dtype=torch.float64),
        "f16_patterns": as_int16.clone().view(torch.float16),
        "bf16_patterns": as_int16.clone().view(torch.bfloat16),
        "i64": torch.tensor([i64_value(i) for i in range(10)], dtype=torch.int64).reshape(2, 5),
        "i32": torch.tensor([small_int_value(i, -(2**31), 2**31 - 1) for i in range(6)],
                            dtype=torch.int64).to(torch.int32),
        "i16": torch.tensor([small_int_value(i, -32768, 32767) for i in range(6)],
                            dtype=torch.int16),
        "i8": torch.tensor([small_int_value(i, -128, 127) for i in range(6)], dtype=torch.int8),
        "u8": torch.tensor([small_int_value(i, 0, 255) for i in range(6)], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(2.6592, dtype=torch.float32),
        "empty": torch.zeros((0, 3), dtype=torch.float32),
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(tensors, OUT, metadata={"format": "pt", "note": "clhclip fixture"})
    os.chmod(OUT, 0o644)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
