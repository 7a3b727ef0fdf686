"""Linear time-invariant state space models: the lecture's starting point, on arrays.

Continuous system (state h (n,), input x (m,), output y (p,)):

    h'(t) = A h(t) + B x(t),        y(t) = C h(t) + D x(t)

Discretized with a step size Delta it becomes a recurrence (recurrent mode)

    h_k = A_bar h_{k-1} + B_bar x_k,  y_k = C h_k + D x_k

and, unrolled from h_{-1} = 0, a convolution (convolutional mode)

    y_k = sum_{j=0..k} K_j x_{k-j} + D x_k,   K = (C B_bar, C A_bar B_bar, C A_bar^2 B_bar, ...)

Zero-order hold (the input is constant over each step) is exact for such inputs:
    A_bar = exp(Delta A),  B_bar = int_0^Delta exp(s A) ds B
computed together as one matrix exponential, exp([[A, B], [0, 0]] Delta) =
[[A_bar, B_bar], [0, I]], which also works when A is singular (the car below).
Bilinear (Tustin): A_bar = (I - Delta/2 A)^-1 (I + Delta/2 A), B_bar = (I - Delta/2 A)^-1 Delta B.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import expm


def _check_step(step):
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"discretize: the step size must be > 0, got {step}")


@dataclass
class DiscreteLTI:
    """h_k = A_bar h_{k-1} + B_bar x_k, y_k = C h_k + D x_k."""
    A_bar: np.ndarray   # (n, n)
    B_bar: np.ndarray   # (n, m)
    C: np.ndarray       # (p, n)
    D: np.ndarray       # (p, m)

    def recurrent(self, x, h0=None):
        """Recurrent mode: x (L, m) -> y (L, p), one step at a time (O(1) state)."""
        h = np.zeros(self.A_bar.shape[0]) if h0 is None else np.asarray(h0, float)
        ys = []
        for x_k in np.asarray(x, float):
            h = self.A_bar @ h + self.B_bar @ x_k                   # h_k = A_bar h_{k-1} + B_bar x_k
            ys.append(self.C @ h + self.D @ x_k)                    # y_k = C h_k + D x_k
        return np.array(ys).reshape(len(ys), self.C.shape[0])

    def kernel(self, L):
        """K (L, p, m): K_j = C A_bar^j B_bar, the response to a unit impulse."""
        K, AjB = [], self.B_bar
        for _ in range(L):
            K.append(self.C @ AjB)
            AjB = self.A_bar @ AjB
        return np.array(K)

    def convolutional(self, x):
        """Convolutional mode: x (L, m) -> y (L, p) = (K * x) + D x, all steps at once."""
        x = np.asarray(x, float)
        L = x.shape[0]
        K = self.kernel(L)                                          # (L, p, m)
        y = np.zeros((L, self.C.shape[0]))
        for j in range(L):                                          # y_k += K_j x_{k-j}
            y[j:] += x[: L - j] @ K[j].T
        return y + x @ self.D.T


@dataclass
class LTISystem:
    """The continuous system h' = A h + B x, y = C h + D x."""
    A: np.ndarray       # (n, n)
    B: np.ndarray       # (n, m)
    C: np.ndarray       # (p, n)
    D: np.ndarray       # (p, m)

    def __post_init__(self):
        self.A, self.B, self.C, self.D = (np.atleast_2d(np.asarray(a, float))
                                          for a in (self.A, self.B, self.C, self.D))
        n, m, p = self.A.shape[0], self.B.shape[1], self.C.shape[0]
        for name, arr, want in (("A", self.A, (n, n)), ("B", self.B, (n, m)),
                                ("C", self.C, (p, n)), ("D", self.D, (p, m))):
            if arr.shape != want:
                raise ValueError(f"LTISystem: {name} must be {want} for A {self.A.shape}, "
                                 f"B {self.B.shape}, C {self.C.shape}; got {arr.shape}")

    def discretize(self, step: float, method: str = "zoh") -> DiscreteLTI:
        _check_step(step)
        n, m = self.B.shape
        if method == "zoh":
            M = np.zeros((n + m, n + m))
            M[:n, :n], M[:n, n:] = self.A, self.B
            E = expm(M * step)                                      # [[A_bar, B_bar], [0, I]]
            A_bar, B_bar = E[:n, :n], E[:n, n:]
        elif method == "bilinear":
            inv = np.linalg.inv(np.eye(n) - step / 2 * self.A)
            A_bar = inv @ (np.eye(n) + step / 2 * self.A)
            B_bar = inv @ (step * self.B)
        else:
            raise ValueError(f"discretize: method must be 'zoh' or 'bilinear', got {method!r}")
        return DiscreteLTI(A_bar, B_bar, self.C, self.D)


def car(observe: str = "position") -> LTISystem:
    """The lecture's car: state h = (position, velocity), input x = acceleration.

        position' = velocity,  velocity' = acceleration      ->  A = [[0, 1], [0, 0]], B = [[0], [1]]
    and we observe the position (or the velocity)."""
    C = [[1.0, 0.0]] if observe == "position" else [[0.0, 1.0]]
    return LTISystem(A=[[0.0, 1.0], [0.0, 0.0]], B=[[0.0], [1.0]], C=C, D=[[0.0]])


def car_exact_position(accel, step: float, x0: float = 0.0, v0: float = 0.0):
    """Exact kinematics for piecewise-constant acceleration: p += v dt + a dt^2 / 2, v += a dt."""
    p, v, out = x0, v0, []
    for a in np.ravel(accel):
        p, v = p + v * step + 0.5 * a * step ** 2, v + a * step
        out.append(p)
    return np.array(out)
