"""The MedRegA demo behind ``src/demo.py`` (web UI and ``--batch``), importable and unit-tested without a server."""
