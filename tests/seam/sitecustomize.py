"""Installs the test fault plan of ``FLEXLORA_TEST_SEAM`` in every Python process that starts
with this folder on its ``PYTHONPATH`` (tests/seam/faults_plan.py says what the plan holds)."""

import os

if os.environ.get("FLEXLORA_TEST_SEAM"):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import faults_plan

    faults_plan.install(os.environ["FLEXLORA_TEST_SEAM"])
