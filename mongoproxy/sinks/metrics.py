"""Placeholder until the metrics sink lands."""

OPTIONS: list = []


def create(config, ctx):
    return None
