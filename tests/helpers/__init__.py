"""Shared helpers of the test suite (not test modules): ``oracles`` (float64 / numpy
references of the math), ``step_cases``, ``engine_cases``, ``models``, ``training``, and
``dist_worker`` (a script torchrun runs)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
