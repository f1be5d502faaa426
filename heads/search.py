"""`accelerate launch --num_processes N -m heads.search ...`: the search's entry point for launched processes.

Only an entry: it runs `avb heads search` (heads.cli) with the same options; the search itself is
heads.training.search, which never imports a command line.
"""
from heads.cli import search_command

if __name__ == "__main__":
    search_command(prog_name="python -m heads.search")
