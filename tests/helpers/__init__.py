"""Shared test helpers: the only test code that test modules may import (besides compare and strategies)."""
