"""Turning graph recording off: `with tinymoe.no_grad(): ...` for inference."""
import functools


class _GradMode:
    enabled = True


def is_grad_enabled() -> bool:
    return _GradMode.enabled


class _SetGradEnabled:
    """Context manager (and decorator) that sets recording on or off, then restores it."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = _GradMode.enabled
        _GradMode.enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _GradMode.enabled = self.previous
        return False

    def __call__(self, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with _SetGradEnabled(self.enabled):
                return func(*args, **kwargs)

        return wrapper


def no_grad():
    """Ops inside record no graph: outputs have requires_grad=False."""
    return _SetGradEnabled(False)


def enable_grad():
    return _SetGradEnabled(True)
