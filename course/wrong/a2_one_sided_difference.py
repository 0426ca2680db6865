"""the numerical gradient with a one-sided difference, (f(x + h) - f(x)) / h.

assignment: a2_backward_and_conv
loses: q3/test_q3_central_and_restores
says: this is the one-sided difference (f(x + h) - f(x)) / h: its error is O(h)
"""
import numpy as np


def numerical_gradient(f, x, dout, h=1e-5):
    grad = np.zeros_like(x)
    base = np.sum(f(x) * dout)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        grad[i] = (np.sum(f(x) * dout) - base) / h
        x[i] = old
    return grad
