"""examples/ssm_car.py: both modes and both discretizations reproduce the car's kinematics."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ssm_car", ROOT / "examples" / "ssm_car.py")
ssm_car = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ssm_car)


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("step", [1.0, 0.3])
def test_modes_agree_and_match_the_held_input_kinematics(step, method):
    r = ssm_car.simulate(step, method)
    np.testing.assert_allclose(r["convolutional"], r["recurrent"], atol=1e-12)
    np.testing.assert_allclose(r["recurrent"], r["held"], atol=1e-12)


def test_sampling_error_shrinks_like_the_step():
    """Holding a(k Delta) over each step lags the true input: the error is O(Delta)."""
    errors = []
    for step in (0.1, 0.05):
        r = ssm_car.simulate(step, "zoh")
        errors.append(np.abs(r["recurrent"] - ssm_car.true_position(r["t"])).max())
    assert 1.7 < errors[0] / errors[1] < 2.3
