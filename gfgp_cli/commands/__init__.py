"""One module per `gfgp` command; each exports ``COMMANDS`` (click commands or groups).

Modules here import only click at import time; torch and the library are imported inside the
command bodies so that ``gfgp --help`` stays fast.
"""
