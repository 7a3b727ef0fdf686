"""Mixture-of-Experts: routers, aux losses, dispatch/combine, stacked experts, the MoE layer."""
from .balanced_assignment import balanced_assignment
from .dispatch import Combine, Permute, combine, permute
from .einsum import moe_einsum
from .experts import Experts, GroupedLinear, grouped_linear
from .layer import MoELayer, router_statistics
from .losses import cv_squared, importance_loss, load_balancing_loss, load_loss, z_loss
from .routers import (ROUTERS, BaseRouter, DenseRouter, ExpertChoiceRouter, GShardRouter,
                      NoisyTopKRouter, Router, Routing, SwitchRouter, TopKRouter, make_router)

__all__ = ["balanced_assignment", "Combine", "Permute", "combine", "permute", "moe_einsum",
           "Experts", "GroupedLinear", "grouped_linear", "MoELayer", "router_statistics",
           "cv_squared", "importance_loss", "load_balancing_loss", "load_loss", "z_loss",
           "ROUTERS", "BaseRouter", "DenseRouter", "ExpertChoiceRouter", "GShardRouter",
           "NoisyTopKRouter", "Router", "Routing", "SwitchRouter", "TopKRouter", "make_router"]
