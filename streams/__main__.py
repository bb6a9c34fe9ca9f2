"""`python -m agentstream` and the `agentstream` console script."""

from agentstream.streams.cli import main

if __name__ == "__main__":
    main()
