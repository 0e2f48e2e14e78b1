"""`python -m ensir_flow`: the command line, as the `ensir-flow` console script runs it."""

from ensir_flow.cli import main

if __name__ == "__main__":
    main(prog_name="ensir-flow")
