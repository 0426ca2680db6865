"""the normalization divides by the unbiased variance (M - 1), as torch.var does.

assignment: a1_batchnorm_numpy
loses: q1/test_q1_small_example, q1/test_q1_reference_float64, q1/test_q1_small_variance
says: y looks normalized with the unbiased variance (divided by M - 1): the spread of your x_hat is 0.9682 of the expected one, sqrt((M-1)/M) = 0.9682 for M = 16
"""
import numpy as np


def bn_train_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(axis=0)
    var = x.var(axis=0, ddof=1)  # unbiased: divide by N - 1
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * inv_std
    y = gamma * x_hat + beta
    return y, (x_hat, inv_std, gamma)
