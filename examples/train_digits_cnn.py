"""Train the demo's vision model: a small CNN on scikit-learn's bundled digits, in seconds, the same
weights every run. Writes the safetensors state dict, the held-out test images as .npz (x in [0, 1],
y labels) and prints the held-out accuracy.

    python examples/train_digits_cnn.py OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from microscope.models.vision import digits_split, train_digits_cnn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, acc = train_digits_cnn(epochs=args.epochs)
    if acc < 0.95:
        raise SystemExit(f"held-out accuracy {acc:.3f} < 0.95; train longer (--epochs)")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "digits_cnn.safetensors")
    _, _, xte, yte = digits_split()
    np.savez(args.out / "digits_test.npz", x=xte, y=yte)
    print(f"digits CNN: held-out accuracy {acc:.4f}; wrote {args.out}/digits_cnn.safetensors, digits_test.npz")


if __name__ == "__main__":
    main()
