"""Reliability cases of issue [6/9]: each failure mode as a test with the message it gives.

A package, so that its module names (test_config, ...) do not clash with those in tests/.
"""
