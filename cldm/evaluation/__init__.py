"""Measuring control: metrics of generated images against their hints (`metrics`), sampling a fixed set of
items with fixed seeds to score a model (`evaluate`), and the picture of a run's logged curves (`run_plot`)."""
