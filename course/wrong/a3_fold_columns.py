"""folding scales the columns of W (inputs) instead of its rows (outputs), bias unshifted.

assignment: a3_scale_and_practice
loses: q3/test_q3_same_output, q3/test_q3_reference
says: W_folded scales the columns of W (W * s); batch norm scales each OUTPUT feature
"""
import numpy as np


def fold_bn_linear(W, b, gamma, beta, running_mean, running_var, eps=1e-5):
    s = gamma / np.sqrt(running_var + eps)
    return W * s, s * (b - running_mean) + beta
