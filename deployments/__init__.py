"""Ray Serve apps and actors: thin shells that put the `rec` library on Ray."""
