"""Training: model building from recipes, the optimisation loop, checkpoints, distributed launch.

Depends on ``blip2cli.models`` and ``blip2cli.data``; nothing in ``models`` depends on this package.
"""
