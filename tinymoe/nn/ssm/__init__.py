"""State space models: from the LTI system of the lecture to Mamba's selective SSM.

lti.py            continuous system, ZOH / bilinear discretization, recurrent and
                  convolutional modes, the car example (plain arrays)
s4d.py            S4D: a trainable diagonal LTI layer (the time-invariant baseline)
selective_scan.py the selective scan as an autograd Function over the kernels
conv.py           the causal depthwise convolution of the Mamba block
mamba.py          MambaBlock, with a recurrent step() for generation
"""
from .conv import CausalConv1d
from .lti import DiscreteLTI, LTISystem, car, car_exact_position
from .mamba import MambaBlock
from .s4d import S4D, S4DBlock
from .selective_scan import SelectiveScan, selective_scan

__all__ = ["LTISystem", "DiscreteLTI", "car", "car_exact_position", "S4D", "S4DBlock", "SelectiveScan",
           "selective_scan", "CausalConv1d", "MambaBlock"]
