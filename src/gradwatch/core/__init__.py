"""Framework-free core: numerics, sampling, the check engine, health rules, policies, schedules.

Imports only the standard library and numpy.
"""
