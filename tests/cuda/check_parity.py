#!/usr/bin/env python3
"""Compares a `moetune forward-backward` output with a Transformers parity fixture.

  python3 tests/cuda/check_parity.py EXPECTED.safetensors OUT.safetensors TOLERANCE

Per tensor: max |out - expected| / max |expected| (the parity tests' measure). Prints the
worst tensors and exits 1 when any exceeds TOLERANCE or a tensor is missing.
"""
import sys

from safetensors.numpy import load_file


def main():
    expected, actual, tolerance = load_file(sys.argv[1]), load_file(sys.argv[2]), float(sys.argv[3])
    errors = []
    for name, ref in expected.items():
        if name not in actual:
            errors.append((float("inf"), name + " (missing)"))
            continue
        out = actual[name].astype("float64").reshape(ref.shape)
        ref = ref.astype("float64")
        scale = max(abs(ref).max(), 1e-12) if ref.size else 1.0
        errors.append((float(abs(out - ref).max()) / scale if ref.size else 0.0, name))
    errors.sort(reverse=True)
    for error, name in errors[:3]:
        print(f"  {error:.2e}  {name}")
    worst = errors[0][0] if errors else 0.0
    print(f"{'PASS' if worst <= tolerance else 'FAIL'} worst {worst:.2e} (tolerance {tolerance:g}, {len(errors)} tensors)")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
