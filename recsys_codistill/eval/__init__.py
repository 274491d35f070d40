"""Evaluation: metrics, churn with bootstrap CIs, evaluation of prediction files. Imports no torch."""
