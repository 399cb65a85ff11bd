"""`python -m bench.faults`: the fault-injection harness (bench/faults/run.py)."""

from bench.faults.run import main

if __name__ == "__main__":
    main()
