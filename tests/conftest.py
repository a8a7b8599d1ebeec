"""Puts tests/ on sys.path (pytest's default import mode inserts the folder of each conftest.py), so
every test module can ``import helpers``."""
