"""Placeholder until the commandlog sink lands."""

OPTIONS: list = []


def create(config, ctx):
    return None
