"""momentum taken the Keras way: the weight of the old value, not of the new batch.

assignment: a1_batchnorm_numpy
loses: q2/test_q2_small_example, q2/test_q2_pytorch_momentum, q2/test_q2_several_steps
says: running_mean moved 90% of the way from its old value to the batch mean; with momentum = 0.1 it should move 10%
says: That is Keras' convention
"""
import numpy as np


def bn_update_running(running_mean, running_var, x, momentum=0.1):
    mu = x.mean(axis=0)
    var = x.var(axis=0, ddof=1)
    running_mean = momentum * running_mean + (1 - momentum) * mu
    running_var = momentum * running_var + (1 - momentum) * var
    return running_mean, running_var
