"""LTI SSMs: discretization, recurrent == convolutional, the car example."""
import numpy as np
import pytest

from tinymoe.nn.ssm import LTISystem, car, car_exact_position


def random_system(n=3, m=2, p=2, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n)) - 2 * np.eye(n)               # stable-ish
    return LTISystem(A, rng.standard_normal((n, m)), rng.standard_normal((p, n)),
                     rng.standard_normal((p, m)))


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("L", [1, 2, 17])
def test_recurrent_and_convolutional_modes_agree(method, L):
    sys = random_system().discretize(0.1, method)
    x = np.random.default_rng(1).standard_normal((L, 2))
    np.testing.assert_allclose(sys.recurrent(x), sys.convolutional(x), rtol=1e-10, atol=1e-12)


def test_kernel_is_the_impulse_response():
    sys = random_system(m=1, p=1).discretize(0.05)
    impulse = np.zeros((6, 1))
    impulse[0] = 1.0
    y = sys.recurrent(impulse)                                    # D x only at t = 0
    K = sys.kernel(6)[:, 0, 0]
    np.testing.assert_allclose(y[:, 0] - np.r_[sys.D[0, 0], np.zeros(5)], K, rtol=1e-12)


def test_zoh_is_exact_for_the_car():
    """Piecewise-constant acceleration: ZOH reproduces the kinematics to rounding."""
    accel = np.random.default_rng(2).uniform(-2, 2, (50, 1))
    for step in (0.01, 0.5):
        pos = car().discretize(step, "zoh").recurrent(accel)[:, 0]
        np.testing.assert_allclose(pos, car_exact_position(accel, step), rtol=1e-10, atol=1e-10)


def test_car_velocity_and_bilinear():
    accel = np.ones((100, 1))                                      # constant 1 m/s^2
    v = car("velocity").discretize(0.1).recurrent(accel)[:, 0]
    np.testing.assert_allclose(v, 0.1 * np.arange(1, 101), rtol=1e-12)
    # For the car A^2 = 0, so bilinear's (I - hA/2)^-1 (I + hA/2) = I + hA = exp(hA): exact too.
    d = car().discretize(0.3, "bilinear")
    z = car().discretize(0.3, "zoh")
    np.testing.assert_allclose(d.A_bar, z.A_bar, atol=1e-14)
    np.testing.assert_allclose(d.B_bar, z.B_bar, atol=1e-14)


def test_bilinear_is_second_order():
    """On a damped oscillator bilinear differs from the exact ZOH by O(step^2)."""
    spring = LTISystem([[0.0, 1.0], [-4.0, -0.5]], [[0.0], [1.0]], [[1.0, 0.0]], [[0.0]])
    errors = []
    for step in (0.1, 0.05):
        n = int(round(4.0 / step))
        x = np.ones((n, 1))                                        # a step input
        exact = spring.discretize(step, "zoh").recurrent(x)
        errors.append(np.abs(spring.discretize(step, "bilinear").recurrent(x) - exact).max())
    assert 3.0 < errors[0] / errors[1] < 5.0                      # halve the step: error / 4


def test_zoh_matrices_for_diagonal_A():
    sys = LTISystem(np.diag([-1.0, -3.0]), [[1.0], [2.0]], [[1.0, 1.0]], [[0.0]])
    d = sys.discretize(0.2)
    np.testing.assert_allclose(np.diag(d.A_bar), np.exp([-0.2, -0.6]), rtol=1e-12)
    np.testing.assert_allclose(d.B_bar[:, 0], (np.exp([-0.2, -0.6]) - 1) / [-1.0, -3.0] * [1, 2],
                               rtol=1e-12)


@pytest.mark.parametrize("step", [0.0, -0.1, np.nan])
def test_non_positive_step(step):
    with pytest.raises(ValueError, match="step size must be > 0"):
        car().discretize(step)


def test_bad_method_and_shapes():
    with pytest.raises(ValueError, match="method must be 'zoh' or 'bilinear'"):
        car().discretize(0.1, "euler")
    with pytest.raises(ValueError, match=r"LTISystem: B must be \(2, 1\)"):
        LTISystem(np.eye(2), np.ones((3, 1)), np.ones((1, 2)), np.zeros((1, 1)))
