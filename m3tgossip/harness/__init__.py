"""Research harnesses: the one-machine testbed as a Python API and the chaos runner."""
