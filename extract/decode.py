"""`accelerate launch [--num_processes N] -m extract.decode --corpus DIR`: `avb corpus decode` in launched processes.

Only an entry: it runs `avb corpus decode` (extract.app.corpus_cli) with the same options. Rank 0 decodes and
writes the store; the other processes wait, then open and check it (extract.decoded_audio).
"""
from extract.app.corpus_cli import decode_command


def main() -> None:
    decode_command(prog_name="python -m extract.decode")


if __name__ == "__main__":
    main()
