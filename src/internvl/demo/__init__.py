"""Helpers of the MedRegA demo (``src/demo.py``): box drawing, upload/input validation and task -> prompt wiring.

Kept out of ``src/demo.py`` so they are importable and unit-tested without starting a web server.
"""
