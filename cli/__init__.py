"""The ``xlmirror`` command line: one parser, a module of commands per part of the toolkit.

``cli`` is the only layer that prints; ``sheets`` and ``engine`` return values and log.
"""
