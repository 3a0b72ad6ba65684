"""The lp command line (launch/run.py): run settings, batch jobs and the program that drives the decoder."""
from .main import build_parser, main, resolve_config

__all__ = ["build_parser", "main", "resolve_config"]
