"""Sample-quality metrics.

- `metrics.fid`: FID, KID, Inception Score, statistics files (pytorch-fid `.npz`, official score_sde
  `pool_3`/`logits`), a streaming float64 feature accumulator (`FeatureStats`).  numpy only.
- `metrics.inception`: pytorch-fid's FID Inception-v3 in Flax (pool_3 and 1008 logits), its weights read
  from `pt_inception-2015-12-05-6726825d.pth` without torch.
- `metrics.mnist_features`: a small CNN classifier whose penultimate layer gives "FID-MNIST" features.
"""
