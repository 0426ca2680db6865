"""running_var stores the biased batch variance (divide by N), not the unbiased one.

assignment: a1_batchnorm_numpy
loses: q2/test_q2_small_example, q2/test_q2_unbiased_running_var, q2/test_q2_several_steps
says: running_var looks biased: the batch variance it averages in is 0.9375 of the expected value for N = 16
"""
import numpy as np


def bn_update_running(running_mean, running_var, x, momentum=0.1):
    mu = x.mean(axis=0)
    var = x.var(axis=0)  # biased: np.var's default ddof=0
    running_mean = (1 - momentum) * running_mean + momentum * mu
    running_var = (1 - momentum) * running_var + momentum * var
    return running_mean, running_var
