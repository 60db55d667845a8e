"""Synthetic data with known truth: ``tessphot simulate`` (calibrated and raw FFIs), light-curve
ensembles, foreign scenes, comparison with truth. Imports every room below the command line.
"""
