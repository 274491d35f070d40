"""The churn study (baseline / ensemble / codistillation over repeats) and its report."""
