"""Data preparation: the workspace layout and ``blip2 download`` (and later ``blip2 capfilt``)."""
