"""eps added to the standard deviation, outside the square root.

assignment: a1_batchnorm_numpy
loses: q1/test_q1_reference_float64, q1/test_q1_small_variance
says: y matches (x - mu) / (sqrt(var) + eps): eps is outside the square root
says: here var = 1.94e-06 with eps = 1e-05, and that feature's x_hat has std 0.992863 instead of 0.402654
"""
import numpy as np


def bn_train_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=0)
    var = ((x - mu) ** 2).mean(axis=0)
    inv_std = 1.0 / (np.sqrt(var) + eps)  # eps outside the square root
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma)
