"""saekit's command-line front end: parsing, progress, tables and exit codes only.

Installed as the package `saekit_cli` (so `import cli` never becomes a global name).
Every command builds a config from `saekit` dataclasses and calls one library function.
"""
