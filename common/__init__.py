"""dydiff's shared code: datasets, environments and the PointMaze simulator, the EDM denoiser and sampler, the
dynamics ensemble and reward model, checkpoints, run folders, presets and the results tables."""
