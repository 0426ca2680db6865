"""statistics over axis 1 (each example's features) instead of axis 0 (the batch).

assignment: a1_batchnorm_numpy
loses: q1/test_q1_small_example, q1/test_q1_reference_float64, q1/test_q1_small_variance
loses: q1/test_q1_float32_large_mean, q5/test_q5_bn_faster
says: y is normalized per row (statistics over axis 1, the 5 features of each example) instead of per column (over axis 0, the 16 examples of the batch)
"""
import numpy as np


def bn_train_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=1, keepdims=True)  # (N, 1): per example, wrong
    var = ((x - mu) ** 2).mean(axis=1, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma)
