"""dydiff's shared code: datasets and environments (and, later, the pretrained models DyDiff uses)."""
