"""LIBERO libero_spatial simulation (`env`) and the scripted expert that demonstrates it (`expert`).

Import the submodules directly: `env` sets headless-rendering defaults before robosuite loads.
"""
