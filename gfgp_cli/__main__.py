"""`python -m gfgp_cli ...` (what torchrun launches) runs the same CLI as `gfgp ...`."""

from .cli import main

if __name__ == "__main__":
    main()
