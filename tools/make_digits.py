"""Regenerate data/digits.npz from scikit-learn's bundled copy of the UCI optical digits.

The project never needs scikit-learn at run time; this script is only for
re-creating the embedded file:  pip install scikit-learn && python tools/make_digits.py

Source: UCI ML hand-written digits (Alpaydin & Kaynak, 1998), CC BY 4.0.
Each image is 8x8 with pixel counts 0..16; they are stored as uint8 scaled to 0..255.
"""
import os

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)   # (1797, 8, 8)
labels = digits.target.astype(np.uint8)                              # (1797,)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'digits.npz')
np.savez_compressed(out, images=images, labels=labels)
print(f'wrote {os.path.normpath(out)}: images {images.shape} uint8, labels {labels.shape}')
