"""``python -m swrgen ...``: the ``swrgen`` command line where its script is not on PATH."""

from swrgen.cli import main

if __name__ == "__main__":
    main(prog_name="swrgen")
