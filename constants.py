"""Values that more than one package must agree on, defined once. Every package may import it."""

import os

IGNORE_INDEX = -100  # a label the loss skips: transformers' and torch's cross-entropy convention
NUM_FRAMES = 8  # frames sampled uniformly from a video (a file or a folder of frames) by default
# The built-in demo: what `train.py` with no arguments runs, and where its assets are named.
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
