"""The lecture's car as a state space model: discretize, run both modes, compare with physics.

State h = (position, velocity), input x = acceleration, output y = position:

    h'(t) = A h + B x,   A = [[0, 1], [0, 0]],  B = [[0], [1]],  C = [[1, 0]],  D = 0

The car accelerates and brakes smoothly, a(t) = sin(t) m/s^2 from rest, so its exact
position is p(t) = t - sin(t). A computer sees samples x_k = a(k Delta) and holds each over
its step. For several step sizes Delta, with zero-order hold (ZOH) and bilinear:

1. recurrent mode   h_k = A_bar h_{k-1} + B_bar x_k,  y_k = C h_k      (one step at a time)
2. convolutional    y = K * x,  K = (C B_bar, C A_bar B_bar, ...)        (all steps at once)
3. compare with the exact kinematics of the held input (car_exact_position: p += v dt +
   a dt^2 / 2, v += a dt): equal to rounding, since both methods are exact for the car
   (A^2 = 0 makes exp(Delta A) = I + Delta A, and bilinear's A_bar, B_bar the same);
4. compare with the true p(t) = t - sin(t): the only error left is sampling a(t) once per
   step, O(Delta).

    python examples/ssm_car.py                       # writes runs/ssm_car/ssm_car.png
    python examples/ssm_car.py --out docs/img        # refreshes the figure of docs/ssm.md

The one example without --device: its systems are 2 x 2 matrices (NumPy, SciPy's expm),
nothing a GPU would speed up; the trainable SSMs of the later examples take --device cuda.
"""
import argparse
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tinymoe.nn.ssm import car, car_exact_position

SECONDS = 10.0


def accel(t):
    return np.sin(t)                                   # m/s^2


def true_position(t):
    return t - np.sin(t)                               # p'' = sin t, p(0) = p'(0) = 0


def simulate(step, method):
    """Positions at t = Delta, 2 Delta, ..., from both modes and the exact held-input kinematics."""
    n = int(round(SECONDS / step))
    x = accel(step * np.arange(n))[:, None]            # (L, 1): x_k = a(k Delta), held on [k Delta, (k+1) Delta)
    d = car().discretize(step, method)
    return dict(t=step * np.arange(1, n + 1),          # y_k is the position at the end of step k
                x=x[:, 0],
                recurrent=d.recurrent(x)[:, 0],        # (L,)
                convolutional=d.convolutional(x)[:, 0],
                held=car_exact_position(x, step))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=float, nargs="+", default=[1.0, 0.5, 0.1],
                   help="step sizes Delta in seconds")
    p.add_argument("--out", default="runs/ssm_car",
                   help="folder for ssm_car.png (created; default %(default)s)")
    args = p.parse_args()

    print("| Delta (s) | method | conv - recurrent | recurrent - held-input kinematics "
          "| recurrent - true p(t) |")
    print("|---|---|---|---|---|")
    runs = {}
    for step in args.steps:
        for method in ("zoh", "bilinear"):
            r = runs[step, method] = simulate(step, method)
            modes = np.abs(r["convolutional"] - r["recurrent"]).max()
            held = np.abs(r["recurrent"] - r["held"]).max()
            truth = np.abs(r["recurrent"] - true_position(r["t"])).max()
            print(f"| {step:g} | {method} | {modes:.1e} | {held:.1e} | {truth:.3f} m |")

    fig, (ax_a, ax_p) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    t = np.linspace(0, SECONDS, 500)
    ax_a.plot(t, accel(t), "k", label="a(t) = sin t")
    coarse = args.steps[0]
    r = runs[coarse, "zoh"]
    ax_a.step(np.append(r["t"] - coarse, SECONDS), np.append(r["x"], r["x"][-1]), where="post",
              label=f"held samples, Delta = {coarse:g} s")
    ax_a.set(xlabel="t (s)", ylabel="acceleration (m/s^2)", title="input x")
    ax_a.legend(fontsize=8)

    ax_p.plot(t, true_position(t), "k", label="exact p(t) = t - sin t")
    for i, step in enumerate(args.steps):
        zoh, bil = runs[step, "zoh"], runs[step, "bilinear"]
        ax_p.plot(zoh["t"], zoh["recurrent"], "o", ms=4, color=f"C{i}", mfc="none",
                  label=f"Delta = {step:g} s: ZOH, recurrent")
        ax_p.plot(bil["t"], bil["convolutional"], "x", ms=4, color=f"C{i}",
                  label=f"Delta = {step:g} s: bilinear, convolutional")
    ax_p.set(xlabel="t (s)", ylabel="position (m)", title="output y: position")
    ax_p.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ssm_car.png")
    fig.savefig(path)
    plt.close(fig)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
