"""the backward pass without the mean(dy) term (the path through mu).

assignment: a1_batchnorm_numpy
loses: q4/test_q4_gradient_check, q4/test_q4_reference_float64
loses: q5/test_q5_bn_faster
says: dx is off by a per-feature constant (the same for every row of a column
says: is the mean(dy) term, dbeta / M, missing?
"""
import numpy as np


def bn_backward(dy, cache):
    x_hat, inv_std, gamma = cache
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    dx = gamma * inv_std * (dy - x_hat * (dy * x_hat).mean(axis=0))  # mean path missing
    return dx, dgamma, dbeta
