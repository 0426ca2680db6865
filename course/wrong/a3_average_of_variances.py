"""SyncBatchNorm's statistics as the average of the shards' means and variances.

assignment: a3_scale_and_practice
loses: q2/test_q2_two_equal_shards, q2/test_q2_unequal_shards
says: mean averages the shard means equally, but the shards have [5, 27, 2] examples
"""
import numpy as np


def sync_batch_stats(shards):
    means = [s.mean(axis=0) for s in shards]
    variances = [s.var(axis=0) for s in shards]
    return np.mean(means, axis=0), np.mean(variances, axis=0)
