"""`Optimizer`: the base class. Holds parameter groups and per-parameter state.

    opt = AdamW([
        {"params": decay_params, "weight_decay": 0.1},
        {"params": no_decay_params, "weight_decay": 0.0},
    ], lr=3e-4)

Each group is a dict with "params" (a list of Parameters) and its own settings;
settings not given in a group come from the defaults (the keyword arguments).
Updates are written on `p.data` in place, with `xp = array_module(p.data)`, so the
same code runs on NumPy and CuPy arrays.

`state_dict()` returns (arrays, meta): a dict name -> ndarray and a JSON-able dict,
so a checkpoint stores them in safetensors without pickle.
"""
from __future__ import annotations

from .. import backend


class Optimizer:
    def __init__(self, params, defaults: dict):
        self.defaults = dict(defaults)
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        if not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = []
        self.state = {}  # id(param) -> dict of that parameter's state (moments, step, ...)
        for group in params:
            self.add_param_group(group)

    def add_param_group(self, group: dict):
        group = dict(group)
        group["params"] = list(group["params"])
        for p in group["params"]:
            if not getattr(p, "requires_grad", False):
                raise TypeError(
                    f"{type(self).__name__}: can only optimize tensors with "
                    f"requires_grad=True, got {type(p).__name__}"
                )
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in group["params"]):
            raise ValueError(f"{type(self).__name__}: a parameter appears in two groups")
        unknown = set(group) - set(self.defaults) - {"params", "initial_lr"}
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown setting(s) {sorted(unknown)}; "
                f"known: {sorted(self.defaults)}"
            )
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.param_groups.append(group)

    def zero_grad(self):
        """Forget every gradient (`p.grad = None`): backward then writes fresh ones."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self, found_inf=None):
        """Update every parameter from its gradient. `found_inf`: a 0-d bool array (on the
        parameters' device) or None; where it is true the step changes nothing (parameters,
        moments, step counts): the divergence guard's and the loss scaler's skipped step."""
        raise NotImplementedError

    @staticmethod
    def _skips(found_inf) -> bool:
        """Whether this step is skipped (reads the flag: one host read on a GPU)."""
        return found_inf is not None and bool(found_inf)

    # ---------------------------------------------------------------- state I/O
    def _indexed_params(self):
        """(index, param) over all groups: the index names a parameter in state_dict."""
        return enumerate(p for group in self.param_groups for p in group["params"])

    def state_dict(self):
        """(arrays, meta): arrays "state.{i}.{key}" -> NumPy array for array-valued
        state; meta has the groups' settings (params as indices) and scalar state."""
        arrays, scalars = {}, {}
        for i, p in self._indexed_params():
            for key, value in self.state.get(id(p), {}).items():
                if hasattr(value, "shape"):
                    arrays[f"state.{i}.{key}"] = backend.to_numpy(value)
                else:
                    scalars.setdefault(str(i), {})[key] = value
        groups, start = [], 0
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            n = len(group["params"])
            settings["params"] = list(range(start, start + n))
            start += n
            groups.append(settings)
        meta = {"type": type(self).__name__, "param_groups": groups, "scalars": scalars}
        return arrays, meta

    def load_state_dict(self, arrays: dict, meta: dict):
        """Restore what `state_dict()` returned; the groups must hold the same
        number of parameters with the same shapes."""
        name = type(self).__name__
        if meta.get("type") != name:
            raise ValueError(f"{name}.load_state_dict: state was saved by {meta.get('type')}")
        saved_sizes = [len(g["params"]) for g in meta["param_groups"]]
        sizes = [len(g["params"]) for g in self.param_groups]
        if saved_sizes != sizes:
            raise ValueError(
                f"{name}.load_state_dict: saved groups hold {saved_sizes} parameters, "
                f"this optimizer's groups hold {sizes}"
            )
        params = dict(self._indexed_params())
        new_state = {}
        for key, value in arrays.items():
            _, i, field = key.split(".", 2)
            p = params[int(i)]
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"{name}.load_state_dict: {key} has shape {tuple(value.shape)}, "
                    f"parameter {i} has shape {tuple(p.shape)}"
                )
            # astype copies: the optimizer owns (and updates in place) its state arrays.
            new_state.setdefault(id(p), {})[field] = backend.to_device(value, p.device).astype(p.dtype)
        for i, fields in meta["scalars"].items():
            new_state.setdefault(id(params[int(i)]), {}).update(fields)
        for group, saved in zip(self.param_groups, meta["param_groups"]):
            # JSON turned tuples (betas) into lists: turn them back.
            group.update({k: tuple(v) if isinstance(v, list) else v
                          for k, v in saved.items() if k != "params"})
        self.state = new_state
