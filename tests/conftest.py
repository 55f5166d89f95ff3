"""Every test runs offline against a private, temporary Minari store."""

import os
import tempfile

# Set before anything imports minari, which reads the store path from the environment.
os.environ["MINARI_DATASETS_PATH"] = tempfile.mkdtemp(prefix="dydiff-test-minari-")
os.environ["DYDIFF_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
