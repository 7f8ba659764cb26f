"""Integration tests: real external programs (a headless browser); each skips when its program is absent."""
