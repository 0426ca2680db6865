"""the backward pass without the x_hat * mean(dy * x_hat) term (the path through var).

assignment: a1_batchnorm_numpy
loses: q4/test_q4_gradient_check, q4/test_q4_reference_float64
says: dx - expected is proportional to x_hat in each column
says: is the x_hat * mean(dy * x_hat) term, x_hat * dgamma / M, missing?
"""
import numpy as np


def bn_backward(dy, cache):
    x_hat, inv_std, gamma = cache
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    dx = gamma * inv_std * (dy - dy.mean(axis=0))  # the variance path is missing
    return dx, dgamma, dbeta
