"""`python -m bench.alignment`: the alignment benchmark (bench/alignment/alignment.py)."""

from bench.alignment.alignment import main

if __name__ == "__main__":
    main()
