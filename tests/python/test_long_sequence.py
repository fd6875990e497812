"""Long sequences (CI-sized version of bench/long_decode.py, whose 1M-token run and chart are in
bench/results/): recurrent decoding and the chunk form against a float64 scan of the same inputs,
for fp32, bf16 and fp16 inputs, with decays up to gamma = 1 - 2^-20 and 1 - 3e-6: no inf/NaN,
and errors within the bounds the benchmark states (long_decode.BOUNDS)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import long_decode  # noqa: E402


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_long_scan_within_stated_bounds(dtype):
    """2^15 tokens through the recurrence (one call per block of 512) and the chunk form."""
    res = long_decode.run(2 ** 15, 512, 8, 8, long_decode.DTYPES[dtype], seed=1, decode="scan",
                          progress=False)
    assert long_decode.check_bounds(dtype, res) == []
    assert res["nonfinite"] == {"recurrent": 0, "chunk": 0}


def test_decode_steps_within_stated_bounds():
    """The decode path proper: one recurrent_step call per token."""
    res = long_decode.run(3000, 1000, 8, 8, torch.float16, seed=2, decode="step", progress=False)
    assert long_decode.check_bounds("float16", res) == []
    assert len(res["tokens"]) == 3
