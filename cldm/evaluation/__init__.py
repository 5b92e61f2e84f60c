"""Measuring control: metrics of generated images against their hints (`metrics`), and sampling a fixed set of
items with fixed seeds to score a model (`evaluate`)."""
