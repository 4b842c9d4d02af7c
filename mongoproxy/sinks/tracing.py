"""Placeholder until the tracing sink lands."""

OPTIONS: list = []


def create(config, ctx):
    return None
