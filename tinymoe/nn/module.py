"""`Module`: the base class of every layer and model.

A Module is a tree. Assigning a `Parameter` or another `Module` to an attribute
registers it, so the whole tree can be walked:

    class MLP(Module):
        def __init__(self):
            super().__init__()
            self.fc1 = Linear(2, 8)          # registered as child "fc1"
            self.fc2 = Linear(8, 1)

    dict(MLP().named_parameters()).keys()  # fc1.weight, fc1.bias, fc2.weight, fc2.bias

Names are dotted paths, as in PyTorch, so `state_dict()` keys read like the
checkpoints of the papers (`blocks.0.mixer.in_proj.weight`).
"""
from __future__ import annotations

from .. import backend
from ..dtypes import is_floating
from .parameter import Parameter


class Module:
    def __init__(self):
        # object.__setattr__: these three must exist before __setattr__ can register.
        object.__setattr__(self, "_parameters", {})  # name -> Parameter (or None)
        object.__setattr__(self, "_modules", {})     # name -> Module (or None)
        object.__setattr__(self, "_buffers", {})     # name -> ndarray (or None)
        object.__setattr__(self, "_non_persistent", set())
        self.training = True

    # ------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__}: call super().__init__() before assigning {name!r}"
            )
        params, modules, buffers = self._parameters, self._modules, self._buffers
        if isinstance(value, Parameter):
            modules.pop(name, None)
            buffers.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}: cannot assign {type(value).__name__} to "
                    f"parameter {name!r} (a Parameter or None expected)"
                )
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}: cannot assign {type(value).__name__} to "
                    f"submodule {name!r} (a Module or None expected)"
                )
            modules[name] = None
        elif name in buffers:
            buffers[name] = value
        # Also a plain attribute, so reading `self.fc1` is Python's fast path.
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for registry in (self._parameters, self._modules, self._buffers):
            registry.pop(name, None)
        self._non_persistent.discard(name)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array, persistent: bool = True):
        """A non-trainable array that moves with `.to()` (and, if persistent, is saved
        in `state_dict()`): running statistics, causal masks, ..."""
        if name in self._parameters or name in self._modules:
            raise KeyError(f"{type(self).__name__}: attribute {name!r} already exists")
        self._buffers[name] = array
        if not persistent:
            self._non_persistent.add(name)
        object.__setattr__(self, name, array)

    def register_parameter(self, name: str, param):
        """Same as `self.name = param`, for names built at run time."""
        setattr(self, name, param)

    def add_module(self, name: str, module):
        """Same as `self.name = module`, for names built at run time ("0", "1", ...)."""
        setattr(self, name, module)

    # ------------------------------------------------------------------ walking
    def named_modules(self, prefix: str = ""):
        """(dotted name, module) for this module and every descendant, each once."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [
                (f"{name}.{child_name}" if name else child_name, child)
                for child_name, child in module._modules.items()
                if child is not None
            ]
            stack.extend(reversed(children))  # reversed: yield in definition order

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_children(self):
        for name, module in self._modules.items():
            if module is not None:
                yield name, module

    def children(self):
        for _, module in self.named_children():
            yield module

    def named_parameters(self, prefix: str = ""):
        """(dotted name, Parameter), each Parameter once (a tied weight is listed
        under its first name only, so an optimizer updates it once)."""
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix: str = ""):
        for module_name, module in self.named_modules(prefix):
            for name, buf in module._buffers.items():
                if buf is not None:
                    yield (f"{module_name}.{name}" if module_name else name), buf

    def num_parameters(self) -> int:
        """Number of trainable scalars (tied weights counted once)."""
        return sum(p.size for p in self.parameters())

    def apply(self, fn):
        """Call `fn(module)` on every module of the tree (e.g. a custom init); returns self."""
        for module in self.modules():
            fn(module)
        return self

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """name -> ndarray for every parameter and persistent buffer.

        The arrays are the live data (no copy): save or copy them before changing
        the model. A tied weight appears under each of its names.
        """
        out = {}
        for module_name, module in self.named_modules():
            dot = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is not None:
                    out[dot + name] = param.data
            for name, buf in module._buffers.items():
                if buf is not None and name not in module._non_persistent:
                    out[dot + name] = buf
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True):
        """Copy arrays into the parameters and buffers, in place (each keeps its
        device and dtype, so optimizers that hold the Parameters stay valid).

        Raises a RuntimeError naming every missing, unexpected and mis-shaped key;
        with `strict=False` missing and unexpected keys are allowed (shapes must
        still match). Returns (missing_keys, unexpected_keys).
        """
        targets = {}  # name -> (module, attribute name, current array)
        for module_name, module in self.named_modules():
            dot = f"{module_name}." if module_name else ""
            for name, param in module._parameters.items():
                if param is not None:
                    targets[dot + name] = (module, name, param.data)
            for name, buf in module._buffers.items():
                if buf is not None and name not in module._non_persistent:
                    targets[dot + name] = (module, name, buf)

        missing = [k for k in targets if k not in state_dict]
        unexpected = sorted(k for k in state_dict if k not in targets)
        mis_shaped = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(targets[k][2].shape)}"
            for k in targets
            if k in state_dict and tuple(state_dict[k].shape) != tuple(targets[k][2].shape)
        ]
        problems = []
        if mis_shaped:
            problems.append("mis-shaped keys: " + "; ".join(mis_shaped))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise RuntimeError(
                f"load_state_dict: the state dict does not fit {type(self).__name__}: "
                + " | ".join(problems)
            )

        for key, (module, name, current) in targets.items():
            if key in state_dict:
                current[...] = backend.to_device(state_dict[key], backend.device_of(current))
        return missing, unexpected

    # ------------------------------------------------------------------- modes
    def train(self, mode: bool = True):
        """Training mode (dropout active, capacity factor for training, ...); returns self."""
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        """Evaluation mode: `train(False)`; returns self."""
        return self.train(False)

    def zero_grad(self):
        """Forget the gradients of every parameter (`grad = None`)."""
        for param in self.parameters():
            param.grad = None

    def to(self, device=None, dtype=None):
        """Move every parameter and buffer to `device` and/or cast to a float `dtype`,
        in place (the Parameter objects stay the same); returns self."""
        if device is not None:
            device = backend.check_device(device)

        def convert(array):
            if device is not None:
                array = backend.to_device(array, device)
            if dtype is not None and is_floating(array.dtype):
                array = array.astype(dtype, copy=False)
            return array

        for module in self.modules():
            for param in module._parameters.values():
                if param is not None:
                    param.data = convert(param.data)
                    if param.grad is not None:
                        param.grad = convert(param.grad)
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = convert(buf)
                    object.__setattr__(module, name, module._buffers[name])
        return self

    # ---------------------------------------------------------------- calling
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ----------------------------------------------------------------- printing
    def extra_repr(self) -> str:
        """The settings shown inside `Name(...)`; layers override it."""
        return ""

    def __repr__(self):
        lines = [f"({name}): " + _indent(repr(child)) for name, child in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _indent(text: str) -> str:
    return text.replace("\n", "\n  ")
