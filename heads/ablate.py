"""`accelerate launch --num_processes N -m heads.ablate ...`: the grid's entry point for launched processes.

Only an entry: it runs `avb heads ablate` (heads.cli) with the same options; the grid itself is
heads.training.grid, which never imports a command line.
"""
from heads.cli import ablate_command

if __name__ == "__main__":
    ablate_command(prog_name="python -m heads.ablate")
