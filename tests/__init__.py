"""
imageio's tests (trial).

Property tests run on shared, loaded machines (CI runs the suite with -j2
beside other work), where Hypothesis's "input generation is slow" health
check and per-example deadlines fail tests that are correct: both are off
for every test here.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("imageio", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("imageio")
