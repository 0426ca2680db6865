"""node by node, xc's gradient takes only the path through x_hat, not the one through var.

assignment: a2_backward_and_conv
loses: q1/test_q1_every_node, q1/test_q1_gradient_check
says: dxc is the first node that is off, walking back from y
says: dx - expected is proportional to x_hat in each column
"""
import numpy as np


def bn_backward_steps(dy, cache):
    xc, std, inv, x_hat, gamma = (cache[k] for k in ("xc", "std", "inv", "x_hat", "gamma"))
    M = dy.shape[0]
    d = {}
    d["dbeta"] = dy.sum(axis=0)
    d["dgamma"] = (dy * x_hat).sum(axis=0)
    d["dx_hat"] = dy * gamma
    d["dinv"] = (d["dx_hat"] * xc).sum(axis=0)
    d["dstd"] = -d["dinv"] / std**2
    d["dvar"] = d["dstd"] / (2 * std)
    d["dxc"] = d["dx_hat"] * inv  # the path through var is missing
    d["dmu"] = -d["dxc"].sum(axis=0)
    d["dx"] = d["dxc"] + d["dmu"] / M
    return d
