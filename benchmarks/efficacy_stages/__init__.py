"""Stages of the efficacy study (``benchmarks/efficacy.py``): world, base model, judge, arms, sampling, report."""
