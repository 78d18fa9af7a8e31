"""The test install itself: Hypothesis runs derandomised, and the optional parts the suite tests are
installed (a missing one fails here instead of skipping tests)."""
import importlib
import os


def test_hypothesis_is_derandomised_by_default():
    from hypothesis import settings
    assert settings.get_profile('fmpsr').derandomize is True
    if os.environ.get('HYPOTHESIS_PROFILE', 'fmpsr') == 'fmpsr':
        assert settings().derandomize is True      # the profile conftest.py loads unless asked otherwise


def test_the_onnx_extra_is_installed():
    for module in ('onnx', 'onnxruntime'):         # the `onnx` extra, part of the `test` extra
        assert importlib.import_module(module).__version__
