"""Experiment drivers, baselines, reports and plots for fedfuse; the ``fedfuse`` CLI."""
